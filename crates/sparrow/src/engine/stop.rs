//! Stop strings matched across token boundaries: text that could still be the start of
//! a stop string is held back; when a stop string completes, the text before it is
//! released and the rest (the stop string included) is never emitted.

/// Holds back text until it cannot be part of a stop string.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What one piece of text releases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// Text safe to emit now.
    pub text: String,
    /// The stop string that completed (generation ends), if any.
    pub stopped: Option<String>,
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Feed the next piece of text.
    pub fn push(&mut self, piece: &str) -> Released {
        self.held.push_str(piece);
        if self.stops.is_empty() {
            return Released {
                text: std::mem::take(&mut self.held),
                stopped: None,
            };
        }
        // The earliest complete stop string (the longest one among those at the same
        // place).
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s)))
            .min_by(|a, b| a.0.cmp(&b.0).then(b.1.len().cmp(&a.1.len())));
        if let Some((at, s)) = hit {
            let text = self.held[..at].to_string();
            let stopped = Some(s.clone());
            self.held.clear();
            return Released { text, stopped };
        }
        // Hold the longest suffix that is a proper prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            let max = s.len().saturating_sub(1).min(self.held.len());
            for n in (keep + 1..=max).rev() {
                let start = self.held.len() - n;
                if self.held.is_char_boundary(start) && s.starts_with(&self.held[start..]) {
                    keep = n;
                    break;
                }
            }
        }
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        Released {
            text,
            stopped: None,
        }
    }

    /// The held text, when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<String>) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for p in pieces {
            let r = m.push(p);
            out.push_str(&r.text);
            if r.stopped.is_some() {
                return (out, r.stopped);
            }
        }
        out.push_str(&m.flush());
        (out, None)
    }

    #[test]
    fn stop_across_pieces_is_never_emitted() {
        assert_eq!(
            run(&["END"], &["abc E", "N", "D more"]),
            ("abc ".to_string(), Some("END".to_string()))
        );
    }

    #[test]
    fn partial_match_is_released_when_it_breaks() {
        let stops = vec!["END".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("x EN").text, "x ");
        assert_eq!(m.push("o").text, "ENo");
        assert_eq!(run(&["END"], &["a EN"]), ("a EN".to_string(), None));
    }

    #[test]
    fn earliest_stop_wins_and_no_stops_pass_through() {
        assert_eq!(
            run(&["bb", "a"], &["xxbba"]),
            ("xx".to_string(), Some("bb".to_string()))
        );
        assert_eq!(run(&[], &["a", "b"]), ("ab".to_string(), None));
        assert_eq!(run(&["", "é!"], &["caf", "é", "!"]).0, "caf");
    }
}
