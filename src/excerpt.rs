//! Bounded quotes of input in messages: a value that is megabytes long must not become a
//! megabyte error message (or log line).

/// The most characters of an input a message quotes.
pub const EXCERPT_CHARS: usize = 80;

/// `text` itself when it has at most [`EXCERPT_CHARS`] characters, else its first ones and
/// `...` (cut on a character boundary, never inside a UTF-8 sequence).
pub fn excerpt(text: &str) -> String {
    match text.char_indices().nth(EXCERPT_CHARS) {
        None => text.to_string(),
        Some((end, _)) => format!("{}...", &text[..end]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_on_a_char_boundary() {
        assert_eq!(excerpt("0-3"), "0-3");
        let long = "é".repeat(1000);
        let cut = excerpt(&long);
        assert_eq!(cut.chars().count(), EXCERPT_CHARS + 3);
        assert!(cut.ends_with("..."));
    }
}
