//! Streaming decoded text while watching for stop strings.
//!
//! Generation decodes the output token by token, and a piece of text may only be shown once it
//! cannot turn out to be part of a stop string, nor part of a character whose UTF-8 bytes have not
//! all arrived yet (a byte-level BPE token can end in the middle of one). [`StopMatcher`] holds
//! back exactly that much and nothing more.

/// Watches the decoded output of one generation for stop strings.
#[derive(Clone, Debug)]
pub struct StopMatcher<'a> {
    stops: &'a [String],
    text: String,
    printed: usize,
    stopped: bool,
}

/// Bytes at the end of `bytes` that begin a UTF-8 sequence whose remaining bytes have not
/// arrived (0 when the end is a complete character or an invalid byte that no later byte can
/// complete).
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back for the lead
        }
        let needed = match b {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return 0,
        };
        return if back < needed { back } else { 0 };
    }
    0
}

impl<'a> StopMatcher<'a> {
    /// A matcher for `stops` (each non-empty; see `SamplingParams::validate`).
    pub fn new(stops: &'a [String]) -> Self {
        StopMatcher {
            stops,
            text: String::new(),
            printed: 0,
            stopped: false,
        }
    }

    /// Takes the whole output so far as bytes (each call a continuation of the last) and returns
    /// the text that has become safe to show. After it reports a stop (see
    /// [`StopMatcher::stopped`]) the output is complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        if self.stopped {
            return String::new();
        }
        let complete = bytes.len() - incomplete_tail(bytes);
        // A prefix that ends on a complete character decodes the same however many bytes follow,
        // so the text only ever grows at its end.
        self.text = String::from_utf8_lossy(&bytes[..complete]).into_owned();
        // Generation ends at the first stop string to be completed, wherever it starts: a later
        // token never exists. Choosing by where a stop ends (then the longest of those ending
        // together) keeps the answer independent of how the bytes were chunked; choosing by where
        // it starts would let a stop that completes later win whenever both arrive in one chunk.
        if let Some((_, cut)) = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text.find(s.as_str()).map(|at| (at + s.len(), at)))
            .min()
        {
            self.stopped = true;
            self.text.truncate(cut);
            return self.emit(cut);
        }
        // Hold back the longest end of the text that could still grow into a stop string.
        let hold = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len())
                    .rev()
                    .find(|&k| s.is_char_boundary(k) && self.text.ends_with(&s[..k]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        self.emit(self.text.len() - hold)
    }

    /// Ends the generation (no more bytes will come): the rest of the text, with a trailing
    /// incomplete character shown as U+FFFD.
    pub fn finish(&mut self, bytes: &[u8]) -> String {
        if !self.stopped {
            self.text = String::from_utf8_lossy(bytes).into_owned();
        }
        self.emit(self.text.len())
    }

    /// Whether a stop string was found.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The output so far, without the stop string and what followed it.
    pub fn text(&self) -> &str {
        &self.text
    }

    fn emit(&mut self, upto: usize) -> String {
        if upto <= self.printed {
            return String::new();
        }
        let piece = self.text[self.printed..upto].to_string();
        self.printed = upto;
        piece
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]], stops: &[String]) -> (String, bool) {
        let mut m = StopMatcher::new(stops);
        let mut all = Vec::new();
        let mut shown = String::new();
        for c in chunks {
            all.extend_from_slice(c);
            shown += &m.push(&all);
            if m.stopped() {
                break;
            }
        }
        shown += &m.finish(&all);
        (shown, m.stopped())
    }

    #[test]
    fn multibyte_stop_strings_do_not_panic() {
        // The bug: slicing the stop string at a byte inside 'é' before checking the boundary.
        let stops = vec!["é".to_string()];
        assert_eq!(run(&[b"ab", "cé".as_bytes()], &stops), ("abc".into(), true));
        let stops = vec!["aé".to_string()];
        assert_eq!(run(&[b"xa", b"y"], &stops), ("xay".into(), false));
    }

    /// The stop completed first wins, however the bytes are chunked: "é" completes before the
    /// longer "\né\n" that starts earlier (chosen by start, the one-chunk run gave "x").
    #[test]
    fn the_first_stop_completed_wins_in_any_chunking() {
        let stops = vec!["é".to_string(), "\né\n".to_string()];
        let text = "x\né\n".as_bytes();
        let want = ("x\n".to_string(), true);
        assert_eq!(run(&[text], &stops), want);
        assert_eq!(run(&[&text[..4], &text[4..]], &stops), want);
        // Stops completed by the same byte: the longest is cut.
        let stops = vec!["é".to_string(), "\né".to_string()];
        assert_eq!(run(&[text], &stops), ("x".to_string(), true));
    }

    #[test]
    fn characters_split_across_tokens_are_held_until_whole() {
        let e = "é".as_bytes(); // 0xC3 0xA9
        let mut m = StopMatcher::new(&[]);
        assert_eq!(m.push(&[b'a', e[0]]), "a");
        assert_eq!(m.push(&[b'a', e[0], e[1]]), "é");
        assert_eq!(incomplete_tail(&[0xF0, 0x9F, 0x98]), 3);
        assert_eq!(incomplete_tail(&[0xF0, 0x9F, 0x98, 0x80]), 0);
        assert_eq!(incomplete_tail(&[0xFF]), 0);
    }
}

#[cfg(test)]
mod properties {
    use super::StopMatcher;
    use proptest::prelude::*;

    /// Text over a small alphabet of 1-, 2-, 3- and 4-byte characters, so stop strings occur and
    /// chunks split characters.
    fn text(chars: std::ops::Range<usize>) -> impl Strategy<Value = String> {
        proptest::collection::vec(
            proptest::sample::select(vec!['a', 'b', '\n', 'é', 'ß', '€', '😀']),
            chars,
        )
        .prop_map(|v| v.into_iter().collect())
    }

    proptest! {
        /// However the bytes arrive, what is shown is exactly the text before the first stop
        /// string to be completed, and it never panics.
        #[test]
        fn shows_exactly_the_text_before_the_first_stop(
            full in text(0..40),
            stops in proptest::collection::vec(text(1..4), 0..3),
            cuts in proptest::collection::vec(0usize..200, 0..12),
        ) {
            let bytes = full.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.push(bytes.len());
            cuts.sort();
            let mut m = StopMatcher::new(&stops);
            let mut shown = String::new();
            for &c in &cuts {
                shown += &m.push(&bytes[..c]);
                if m.stopped() {
                    break;
                }
            }
            shown += &m.finish(bytes);
            // The stop completed first (then the longest of those completing together).
            let first = stops
                .iter()
                .filter_map(|s| full.find(s.as_str()).map(|at| (at + s.len(), at)))
                .min()
                .map(|(_, at)| at);
            let expected = &full[..first.unwrap_or(full.len())];
            prop_assert_eq!(&shown, expected);
            prop_assert_eq!(m.text(), expected);
            prop_assert_eq!(m.stopped(), first.is_some());
        }
    }
}
