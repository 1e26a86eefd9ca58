//! Stop strings over streamed text: finds a stop string even when it spans
//! token boundaries, cuts the text exactly before it, and holds back any
//! tail that could still become one so nothing past a stop is ever emitted.

/// Text of one sequence as it grows, with what may be emitted so far.
#[derive(Clone, Debug, Default)]
pub struct StopText {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

impl StopText {
    pub fn new(stops: Vec<String>) -> Self {
        StopText {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            text: String::new(),
            emitted: 0,
        }
    }

    /// Append a decoded piece. Returns `(safe new text, stopped)`: when a stop
    /// string appears, the text ends right before it and `stopped` is true.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        let search_from = self.emitted.saturating_sub(self.longest_stop());
        self.text.push_str(piece);
        let mut cut: Option<usize> = None;
        for s in &self.stops {
            let from = floor_boundary(&self.text, search_from);
            if let Some(i) = self.text[from..].find(s.as_str()) {
                cut = Some(cut.map_or(from + i, |c: usize| c.min(from + i)));
            }
        }
        if let Some(c) = cut {
            self.text.truncate(c);
            let out = self.text.get(self.emitted..).unwrap_or("").to_string();
            self.emitted = self.text.len();
            return (out, true);
        }
        let safe = self.text.len() - self.held_back();
        let safe = floor_boundary(&self.text, safe).max(self.emitted);
        let out = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        (out, false)
    }

    /// Whatever is still held back (at the end of the sequence).
    pub fn flush(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }

    /// The whole text so far (cut at a stop string once one is found).
    pub fn text(&self) -> &str {
        &self.text
    }

    fn longest_stop(&self) -> usize {
        self.stops.iter().map(String::len).max().unwrap_or(0)
    }

    /// Bytes at the end of the text that are a proper prefix of some stop string.
    fn held_back(&self) -> usize {
        let mut hold = 0;
        for s in &self.stops {
            for k in (1..s.len()).rev() {
                if k > hold && self.text.len() >= k && self.text.as_bytes().ends_with(&s.as_bytes()[..k]) {
                    hold = k;
                    break;
                }
            }
        }
        hold
    }
}

/// The largest char boundary at or below `i`.
fn floor_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut st = StopText::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (o, stop) = st.push(p);
            out += &o;
            if stop {
                return (out, true);
            }
        }
        out += &st.flush();
        (out, false)
    }

    #[test]
    fn a_stop_string_across_token_boundaries_cuts_exactly() {
        assert_eq!(run(&["\n\n"], &["Hello", " world\n", "\nnext"]), ("Hello world".into(), true));
        assert_eq!(run(&["END"], &["abcE", "N", "Dxyz"]), ("abc".into(), true));
        assert_eq!(run(&["END"], &["abcEN", "x"]), ("abcENx".into(), false), "a partial match is released");
        assert_eq!(run(&["x", "bc"], &["abcx"]), ("a".into(), true), "the earliest stop wins");
    }

    #[test]
    fn held_back_text_never_leaks_past_a_stop() {
        let mut st = StopText::new(vec!["STOP".into()]);
        assert_eq!(st.push("go ST"), ("go ".into(), false));
        assert_eq!(st.push("O"), ("".into(), false));
        assert_eq!(st.push("P and more"), ("".into(), true));
        assert_eq!(st.text(), "go ");
    }

    #[test]
    fn multi_byte_text_is_cut_on_char_boundaries() {
        assert_eq!(run(&["☃"], &["héllo ", "wörld ☃ x"]), ("héllo wörld ".into(), true));
        assert_eq!(run(&["é!"], &["caf", "é", "?"]), ("café?".into(), false));
    }
}
