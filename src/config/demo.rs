//! `[demo]`: the demo page the edge can serve at `GET /` (`clients/js/demo.html`, built on
//! `/edgeplex.js`). Off by default: a production edge answers `/` with one line of text.

use serde::{Deserialize, Serialize};

/// `[demo]` as operators write it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DemoSection {
    pub enabled: bool,
}

/// `[demo]` as the edge reads it.
#[derive(Debug, Clone, Default)]
pub struct DemoConfig {
    /// `GET /` serves the demo page instead of the one-line text answer.
    pub enabled: bool,
}

impl DemoSection {
    /// A bool has no wrong value; the step exists so the section reads like the others.
    pub fn validate(&self) -> DemoConfig {
        DemoConfig {
            enabled: self.enabled,
        }
    }
}
