//! The history scripts and the keys they touch: publish (append, publish, trim, budget) and
//! replay, and the envelope a published message carries.

use super::*;

/// Bytes counted against `bus.history_bytes` for each channel with a Redis history, besides
/// its entries: Redis 7 gives a stream its first node at `stream-node-max-bytes` (4 KiB) at once,
/// so a stream of one small entry holds ~4.7 KB; and the channel's places in the index.
pub const HISTORY_CHANNEL_BYTES: usize = 5 * 1024;
/// Bytes counted for each history entry besides its data (the entry's id and framing in the
/// stream node; a node of its own for a large one).
pub(super) const HISTORY_ENTRY_BYTES: usize = 64;
/// Entries a stream may hold past `bus.history_len` before one publish trims them all: trimming
/// on every publish rescans the stream's first node each time (measured: XADD 3 → 7 µs).
pub(super) const HISTORY_TRIM_SLACK: usize = 100;
/// Histories one publish drops for the budget, at most: a budget that shrank (a node started
/// with a smaller `bus.history_bytes`) is met over several publishes, never in one script that
/// holds Redis for long (one dropped 12,736 channels in 229 ms).
pub(super) const HISTORY_EVICTIONS_PER_PUBLISH: usize = 64;
/// Appends to the history stream and publishes the envelope in one atomic step, so the order of
/// stream ids is the order subscribers see; then keeps the channel within its share and all
/// histories within their byte budget.
///
/// KEYS: the channel's stream, the history index (a sorted set: stream key → when it expires,
/// ms, exactly), the history sizes (a hash: stream key → bytes counted; `#total` → their sum; no
/// channel name holds `#`, so no stream key is `#total`). ARGV: data, history_len, history_ttl
/// (ms), pub/sub channel, history_ttl_unsubscribed (ms), history_bytes, [`HISTORY_ENTRY_BYTES`],
/// [`HISTORY_CHANNEL_BYTES`], [`HISTORY_TRIM_SLACK`], history_channel_bytes,
/// [`HISTORY_EVICTIONS_PER_PUBLISH`], and the publish command (`SPUBLISH` under Redis Cluster;
/// `PUBLISH` when absent). Returns the stream id, the channels evicted, the bytes all
/// histories then hold, and how many channels they are (-1 when this publish took none out of
/// the index, to spare the count).
///
/// `PUBLISH` says how many subscribers (nodes, backends) heard the message: none, and the stream
/// expires after the short life. Past the budget, the channels that would expire first go (so the
/// unheard ones first), the one published to last of all, at most
/// [`HISTORY_EVICTIONS_PER_PUBLISH`] per publish.
///
/// Counting: a publish adds its entry's estimated bytes; a trim (past `history_len` and the slack,
/// or past the channel's share) sets the channel's count to Redis's own figure, `MEMORY USAGE
/// key SAMPLES 0`, which walks the stream's nodes (a few dozen at most: the share bounds them)
/// and reads no entry. Nothing here reads entries back.
///
/// Offsets: after `DEL`, an `XADD *` in the same millisecond would restart at `<ms>-0` and repeat
/// an offset already given out. A stream is only dropped outright once the clock is past its last
/// id; otherwise it is emptied (`XTRIM MAXLEN 0`: an empty stream keeps its last id, so the next
/// `XADD` goes on from it) and expires a millisecond after that id.
///
/// Nothing after `PUBLISH` may fail (the message is out: a failure would make its publisher
/// retry, and so duplicate it), so every key the script meets is checked before it is used.
///
/// The index and sizes are two keys every publish touches, and evicted streams are keys the
/// script finds rather than is given: fine for one Redis, not for Redis Cluster (a script there
/// touches the keys of one slot). Under Cluster they become one index and one size table per
/// slot, each key hash-tagged to it, with the budget split among them.
pub(super) const PUBLISH_LUA: &str = r#"
local stream, index, sizes = KEYS[1], KEYS[2], KEYS[3]
local data, len, slack = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[9])
local budget, per_entry, per_channel = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local cap, most = tonumber(ARGV[10]), tonumber(ARGV[11])
local function ms(id) return tonumber(string.match(id, '^%d+')) end
local n = redis.call('XLEN', stream)
local id = redis.call('XADD', stream, '*', 'd', data)
local heard = redis.call(ARGV[12] or 'PUBLISH', ARGV[4], '{"$edgeplex":"' .. id .. '","data":' .. data .. '}')
-- An entry's data in Redis's allocations: an eighth more, the spacing of jemalloc's classes.
local delta = #data + math.floor(#data / 8) + per_entry
-- The id's time is Redis's clock, the one that runs the key's expiry. The index holds the exact
-- expiry (so the soonest to expire go first, not the first by name); the key's own is rounded up
-- to a 64th of the life, so most publishes leave it as it is, and never loses life it has.
local life = tonumber(heard > 0 and ARGV[3] or ARGV[5])
local step = math.max(math.floor(life / 64), 1)
local function rounded(t) return (math.floor(t / step) + 1) * step end
local expiry = ms(id) + life
local old = tonumber(redis.call('ZSCORE', index, stream) or 0)
if n == 0 or expiry > old then
  -- (A new or emptied stream starts afresh, whatever its place said.)
  redis.call('ZADD', index, expiry, stream)
  if n == 0 or rounded(expiry) > rounded(old) then
    redis.call('PEXPIREAT', stream, rounded(expiry))
  end
end
local size, total
local channels = -1
if n == 0 then
  -- New, emptied, or it expired or went: what was counted for it is stale.
  local stale = tonumber(redis.call('HGET', sizes, stream) or 0)
  size = per_channel + delta
  redis.call('HSET', sizes, stream, size)
  total = redis.call('HINCRBY', sizes, '#total', size - stale)
  channels = 0
else
  size = redis.call('HINCRBY', sizes, stream, delta)
  if size < per_channel then
    -- Entries from before the count (a stream this script did not make) left uncounted.
    delta = delta + per_channel - size
    size = per_channel
    redis.call('HSET', sizes, stream, size)
  end
  total = redis.call('HINCRBY', sizes, '#total', delta)
end
-- Trims: past history_len and the slack, down to history_len; past the channel's share, down to
-- the newest entries that fit 7/8 of it, judged by their average size (the new one's is known),
-- checked against Redis's figure and tried again, a few times at most.
local count = n + 1
for pass = 1, 4 do
  local keep = count
  if count > len + slack then keep = len end
  if size > cap then
    local room = math.floor(cap * 7 / 8) - per_channel - delta
    if per_channel + delta > cap then
      keep = 0
    elseif room <= 0 or count < 2 then
      keep = 1
    else
      local each = math.max((size - per_channel - delta) / (count - 1), 1)
      keep = math.min(keep, 1 + math.floor(room / each))
      if pass > 1 then keep = math.min(keep, math.floor(count / 2)) end
    end
  end
  if keep >= count then break end
  redis.call('XTRIM', stream, 'MAXLEN', '=', keep)
  count = keep
  local real = math.max(redis.call('MEMORY', 'USAGE', stream, 'SAMPLES', 0) or 0, per_channel)
  redis.call('HSET', sizes, stream, real)
  total = redis.call('HINCRBY', sizes, '#total', real - size)
  size = real
end
-- Takes a stream out for the budget; false when it had gone already (expired) or is not ours.
local now
local function drop(key)
  if redis.call('TYPE', key)['ok'] ~= 'stream' then return false end
  local last = 0
  local info = redis.call('XINFO', 'STREAM', key)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = ms(info[i + 1]) end
  end
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  if last < now then
    -- Any later XADD gets a later millisecond: the stream may go, freed off the main thread.
    redis.call('UNLINK', key)
  else
    redis.call('XTRIM', key, 'MAXLEN', 0)
    redis.call('PEXPIREAT', key, last + 1)
  end
  return true
end
-- The sizes hold one field per stream in the index, and #total. More fields than that and the
-- index was lost (Redis dropped it, e.g. under an allkeys-* maxmemory-policy): the count would
-- stay over the budget for good, and every publish drop every history. It starts over.
if total > budget and redis.call('HLEN', sizes) - 1 > redis.call('ZCARD', index) then
  redis.call('UNLINK', sizes)
  redis.call('HSET', sizes, stream, size)
  total = redis.call('HINCRBY', sizes, '#total', size)
end
-- Past the budget, the streams that would expire first go; this one only when it is all that is
-- left (a single history larger than the budget).
local evicted, popped, kept = 0, 0, nil
while total > budget and popped < most do
  local first = redis.call('ZPOPMIN', index)
  local victim = first[1]
  if victim == stream and not kept and redis.call('ZCARD', index) > 0 then
    kept = first[2]
  else
    if not victim and kept then
      victim, kept = stream, nil
    end
    if not victim then
      -- Over the budget with nothing left to drop: the count drifted. It starts over.
      redis.call('UNLINK', sizes)
      total = 0
      break
    end
    popped = popped + 1
    local b = tonumber(redis.call('HGET', sizes, victim) or 0)
    redis.call('HDEL', sizes, victim)
    total = redis.call('HINCRBY', sizes, '#total', -b)
    if drop(victim) then evicted = evicted + 1 end
  end
end
if kept then
  redis.call('ZADD', index, kept, stream)
end
if popped > 0 or channels == 0 then
  channels = redis.call('ZCARD', index)
end
return {id, evicted, total, channels}
"#;

/// Reads a resume's window in one atomic step: the stream's oldest and newest ids (whether the
/// history reaches back to `since`), then entries newest first after `since`, a few at a time,
/// until the window is full. Only the window's entries leave Redis, and Redis itself reads at
/// most a page more, however long the history.
///
/// KEYS: the channel's stream. ARGV: `since` (exclusive), the window's frames and bytes,
/// [`REPLAY_FRAME_BYTES`]. Returns the oldest id, the newest id (nil when there is no stream),
/// 1 when the window ended before `since`, and the entries kept as `{id, data}`, newest first.
pub(super) const REPLAY_LUA: &str = r#"
local stream = KEYS[1]
local frames, bytes, per_entry = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
local kept, used, cut = {}, 0, 0
local high = '+'
while frames > 0 and cut == 0 do
  local want = math.min(frames - #kept + 1, 16)
  local page = redis.call('XREVRANGE', stream, high, '(' .. ARGV[1], 'COUNT', want)
  for _, e in ipairs(page) do
    local f, d = e[2], nil
    for i = 1, #f, 2 do
      if f[i] == 'd' then d = f[i + 1] end
    end
    if d then
      if #kept >= frames or used + #d + per_entry > bytes then
        cut = 1
        break
      end
      used = used + #d + per_entry
      kept[#kept + 1] = {e[1], d}
    end
    high = '(' .. e[1]
  end
  if #page < want then break end
end
return {first and first[1] or false, last and last[1] or false, cut, kept}
"#;

/// What [`REPLAY_LUA`] answers.
pub(super) type ReplayReply = (Option<String>, Option<String>, i64, Vec<(String, Vec<u8>)>);

pub(super) const ENVELOPE_HEAD: &str = r#"{"$edgeplex":""#;
pub(super) const ENVELOPE_DATA: &str = r#"","data":"#;
/// What the publish script answers: the stream id, the channels it evicted, and the bytes and
/// channels all histories then hold.
pub(super) type PublishReply = (String, u64, i64, i64);

/// Splits `{"$edgeplex":"<offset>","data":<data>}` without a full JSON parse.
pub(super) fn parse_envelope(payload: &str) -> Option<(Offset, &str)> {
    let rest = payload.strip_prefix(ENVELOPE_HEAD)?;
    let end = rest.find('"')?;
    let offset = rest[..end].parse().ok()?;
    let data = rest[end..].strip_prefix(ENVELOPE_DATA)?.strip_suffix('}')?;
    Some((offset, data))
}
