//! A real SSE client for tests: reqwest over TLS trusting the dev certificate, and a stream
//! parser that follows the WHATWG rules (eventsource-stream).

use eventsource_stream::{Event, Eventsource};
use futures_util::{Stream, StreamExt};
use serde_json::Value;

use super::TestEdge;

pub fn client(t: &TestEdge, h2: bool) -> reqwest::Client {
    let der = t.edge.dev_cert().unwrap().der.clone();
    let b = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_der(&der).unwrap())
        .resolve("localhost", t.edge.tls_addr());
    let b = if h2 {
        b.http2_prior_knowledge()
    } else {
        b.http1_only()
    };
    b.build().unwrap()
}

pub fn url(t: &TestEdge, query: &str) -> String {
    format!("https://localhost:{}/sse?{query}", t.edge.tls_addr().port())
}

pub type Events = std::pin::Pin<Box<dyn Stream<Item = Event> + Send>>;

/// Opens a stream; panics unless it is a 200 event stream.
pub async fn open(t: &TestEdge, h2: bool, query: &str, last_event_id: Option<&str>) -> Events {
    let mut req = client(t, h2).get(url(t, query));
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.version(),
        if h2 {
            reqwest::Version::HTTP_2
        } else {
            reqwest::Version::HTTP_11
        }
    );
    let h = resp.headers();
    assert_eq!(h["content-type"], "text/event-stream");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-accel-buffering"], "no");
    Box::pin(
        resp.bytes_stream()
            .eventsource()
            .map(|e| e.expect("a well-formed event stream")),
    )
}

pub async fn next(events: &mut Events) -> Event {
    tokio::time::timeout(super::TIMEOUT, events.next())
        .await
        .expect("an event before the timeout")
        .expect("the stream is still open")
}

pub fn data(e: &Event) -> Value {
    serde_json::from_str(&e.data).expect("event data is JSON")
}

/// The welcome event (its id is the stream's starting position).
pub async fn welcome(events: &mut Events) -> Event {
    let e = next(events).await;
    assert_eq!(data(&e)["op"], "welcome", "{e:?}");
    e
}
