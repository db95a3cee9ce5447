//! docs/BENCHMARKS.md is assembled from sections, each between two HTML comment markers, so
//! `bench/run.sh dataplane` rewrites the data-plane tables and leaves the others as they were.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpliceError {
    #[error("section name {0:?} must be lowercase letters, digits or '-'")]
    BadName(String),
    #[error("section {0:?} has a begin marker without an end marker")]
    Unterminated(String),
}

pub fn begin_marker(section: &str) -> String {
    format!("<!-- bench:{section}:begin -->")
}

pub fn end_marker(section: &str) -> String {
    format!("<!-- bench:{section}:end -->")
}

/// Returns `doc` with the text between `section`'s markers replaced by `fragment`; a section the
/// document does not have yet is appended at the end.
pub fn splice_section(doc: &str, section: &str, fragment: &str) -> Result<String, SpliceError> {
    if section.is_empty()
        || !section
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(SpliceError::BadName(section.to_owned()));
    }
    let (begin, end) = (begin_marker(section), end_marker(section));
    let body = format!("{begin}\n{}\n{end}", fragment.trim_end());
    match doc.find(&begin) {
        Some(start) => {
            let after_begin = start + begin.len();
            let stop = doc[after_begin..]
                .find(&end)
                .map(|offset| after_begin + offset + end.len())
                .ok_or_else(|| SpliceError::Unterminated(section.to_owned()))?;
            Ok(format!("{}{body}{}", &doc[..start], &doc[stop..]))
        }
        None => {
            let mut out = doc.trim_end().to_owned();
            if !out.is_empty() {
                out.push_str("\n\n");
            }
            out.push_str(&body);
            out.push('\n');
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_the_named_section() {
        let doc = "# Title\n\n<!-- bench:a:begin -->\nold a\n<!-- bench:a:end -->\n\n<!-- bench:b:begin -->\nold b\n<!-- bench:b:end -->\n";
        let out = splice_section(doc, "a", "new a\n").unwrap();
        assert_eq!(
            out,
            "# Title\n\n<!-- bench:a:begin -->\nnew a\n<!-- bench:a:end -->\n\n<!-- bench:b:begin -->\nold b\n<!-- bench:b:end -->\n"
        );
        assert_eq!(
            splice_section(&out, "a", "new a").unwrap(),
            out,
            "idempotent"
        );
    }

    #[test]
    fn appends_a_new_section_and_refuses_broken_ones() {
        assert_eq!(
            splice_section("# T\n", "audit", "x").unwrap(),
            "# T\n\n<!-- bench:audit:begin -->\nx\n<!-- bench:audit:end -->\n"
        );
        assert!(matches!(
            splice_section("<!-- bench:a:begin -->\n", "a", "x"),
            Err(SpliceError::Unterminated(_))
        ));
        assert!(matches!(
            splice_section("", "A b", "x"),
            Err(SpliceError::BadName(_))
        ));
    }
}
