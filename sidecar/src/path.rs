//! Request-target hygiene and path templates. Pure functions, no I/O.
//!
//! The proxy never *normalises* a suspicious path into something it forwards: it refuses it.
//! A path such as `/stripe/../openai/v1/chat/completions`, `/v1%2Fcharges` or `//v1/charges`
//! could mean different things to the sidecar and to the upstream, so none of them is forwarded.
use keybrake_api::Vendor;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request target must be an absolute path starting with '/'")]
    NotOriginForm,
    #[error("the path contains an empty segment ('//')")]
    EmptySegment,
    #[error("the path contains a '.' or '..' segment")]
    DotSegment,
    #[error("the path contains an encoded separator, dot, NUL or percent sign")]
    EncodedTrick,
    #[error("the path contains a backslash or a control character")]
    ForbiddenCharacter,
    #[error("no vendor is routed at this path prefix")]
    UnknownPrefix,
}

/// Checks that `path` (without the query) is a plain absolute path: no empty, `.` or `..`
/// segments, no percent-encoded `/`, `\`, `.`, `%` or NUL, no backslashes or control characters.
/// A single trailing slash is allowed (it simply will not match templates without one).
pub fn check_path(path: &str) -> Result<(), PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    let bytes = path.as_bytes();
    // Segments: what lies between the leading `/` and one optional trailing `/`. One pass over
    // the bytes checks characters and segments alike; a character error wins over a segment
    // error found earlier (the order the checks have always been reported in).
    let segments_end = if bytes.len() > 1 && bytes[bytes.len() - 1] == b'/' {
        bytes.len() - 1
    } else {
        bytes.len()
    };
    let mut segment_error = None;
    let mut segment_start = 1;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\\' || b < 0x20 || b == 0x7f {
            return Err(PathError::ForbiddenCharacter);
        }
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(PathError::EncodedTrick)?;
            let decoded = std::str::from_utf8(hex)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(PathError::EncodedTrick)?;
            if matches!(decoded, b'/' | b'\\' | b'.' | b'%' | 0) {
                return Err(PathError::EncodedTrick);
            }
        }
        if b == b'/' && i > 0 && i < segments_end && segment_error.is_none() {
            segment_error = segment_problem(&bytes[segment_start..i]);
            segment_start = i + 1;
        }
    }
    if segments_end > 1 && segment_error.is_none() {
        segment_error = segment_problem(&bytes[segment_start..segments_end]);
    }
    segment_error.map_or(Ok(()), Err)
}

fn segment_problem(segment: &[u8]) -> Option<PathError> {
    match segment {
        b"" => Some(PathError::EmptySegment),
        b"." | b".." => Some(PathError::DotSegment),
        _ => None,
    }
}

/// Splits a prefix-routed path `/{vendor}/rest` into the vendor and `/rest`.
pub fn split_vendor_prefix(path: &str) -> Result<(Vendor, &str), PathError> {
    let rest = path.strip_prefix('/').ok_or(PathError::NotOriginForm)?;
    let (name, tail_start) = match rest.find('/') {
        Some(i) => (&rest[..i], i + 1),
        None => return Err(PathError::UnknownPrefix),
    };
    let vendor = Vendor::parse(name).ok_or(PathError::UnknownPrefix)?;
    // Keep the leading '/' of the remainder.
    Ok((vendor, &path[tail_start..]))
}

/// Does `path` match `template`? `{name}` matches exactly one non-empty segment; a segment such
/// as `{Sid}.json` matches a non-empty prefix followed by the literal suffix. No allocation.
/// Runs for every catalogue operation of the request's method on every call, so it works on
/// bytes (a `str::split` per segment costs several times more).
pub fn template_matches(template: &str, path: &str) -> bool {
    let (mut template, mut path) = (template.as_bytes(), path.as_bytes());
    if !template.contains(&b'{') {
        return template == path;
    }
    loop {
        let (t, t_rest) = next_segment(template);
        let (p, p_rest) = next_segment(path);
        if !segment_matches(t, p) {
            return false;
        }
        match (t_rest, p_rest) {
            (None, None) => return true,
            (Some(t_rest), Some(p_rest)) => (template, path) = (t_rest, p_rest),
            _ => return false,
        }
    }
}

/// The bytes up to the first `/`, and what follows it (`None` when there is no `/`): the
/// segments `str::split('/')` would yield, one at a time.
fn next_segment(s: &[u8]) -> (&[u8], Option<&[u8]>) {
    match s.iter().position(|b| *b == b'/') {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    }
}

fn segment_matches(template: &[u8], segment: &[u8]) -> bool {
    if template.first() == Some(&b'{')
        && let Some(close) = template.iter().position(|b| *b == b'}')
    {
        let suffix = &template[close + 1..];
        return segment.len() > suffix.len() && segment.ends_with(suffix);
    }
    template == segment
}

/// Value of the segment in `path` that sits where `{name}` sits in `template`, if it matches.
pub fn template_capture<'p>(template: &str, path: &'p str, name: &str) -> Option<&'p str> {
    if !template_matches(template, path) {
        return None;
    }
    for (ts, ps) in template.split('/').zip(path.split('/')) {
        if let Some(inner) = ts.strip_prefix('{')
            && let Some(close) = inner.find('}')
            && &inner[..close] == name
        {
            let suffix = &inner[close + 1..];
            return Some(&ps[..ps.len() - suffix.len()]);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_pass() {
        for ok in [
            "/v1/charges",
            "/v1/customers/cus_123",
            "/2010-04-01/Accounts/AC1/Messages.json",
            "/emails/batch",
            "/v1/charges/",
            "/",
            "/v1/customers/a%40b",
            "//",
            "/a",
            "/a/",
            "/...",
            "/.x/x.",
        ] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn tricks_are_refused() {
        for (bad, err) in [
            ("v1/charges", PathError::NotOriginForm),
            ("//v1/charges", PathError::EmptySegment),
            ("/v1//charges", PathError::EmptySegment),
            ("/stripe/../openai/v1/chat", PathError::DotSegment),
            ("/v1/./charges", PathError::DotSegment),
            ("/..", PathError::DotSegment),
            ("/v1%2Fcharges", PathError::EncodedTrick),
            ("/v1%2fcharges", PathError::EncodedTrick),
            ("/v1/%2e%2e/x", PathError::EncodedTrick),
            ("/v1/%252F", PathError::EncodedTrick),
            ("/v1/%5Cx", PathError::EncodedTrick),
            ("/v1/%00", PathError::EncodedTrick),
            ("/v1/%zz", PathError::EncodedTrick),
            ("/v1/%2", PathError::EncodedTrick),
            ("/v1\\..\\x", PathError::ForbiddenCharacter),
            ("/v1/\tx", PathError::ForbiddenCharacter),
            // Character errors are reported before segment errors wherever they sit.
            ("/v1//x\\", PathError::ForbiddenCharacter),
            ("/../%2F", PathError::EncodedTrick),
            ("/v1/.//", PathError::DotSegment),
            ("/v1/x//", PathError::EmptySegment),
            ("/./", PathError::DotSegment),
            ("/a/..", PathError::DotSegment),
        ] {
            assert_eq!(check_path(bad), Err(err), "{bad}");
        }
    }

    /// The two-pass check this module used before the one-pass one, kept as the reference.
    fn two_pass_check_path(path: &str) -> Result<(), PathError> {
        let rest = path.strip_prefix('/').ok_or(PathError::NotOriginForm)?;
        let bytes = path.as_bytes();
        for (i, &b) in bytes.iter().enumerate() {
            if b == b'\\' || b < 0x20 || b == 0x7f {
                return Err(PathError::ForbiddenCharacter);
            }
            if b == b'%' {
                let hex = bytes.get(i + 1..i + 3).ok_or(PathError::EncodedTrick)?;
                let decoded = std::str::from_utf8(hex)
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or(PathError::EncodedTrick)?;
                if matches!(decoded, b'/' | b'\\' | b'.' | b'%' | 0) {
                    return Err(PathError::EncodedTrick);
                }
            }
        }
        let trimmed = rest.strip_suffix('/').unwrap_or(rest);
        if trimmed.is_empty() {
            return Ok(());
        }
        for segment in trimmed.split('/') {
            match segment {
                "" => return Err(PathError::EmptySegment),
                "." | ".." => return Err(PathError::DotSegment),
                _ => {}
            }
        }
        Ok(())
    }

    #[test]
    fn one_pass_check_agrees_with_the_two_pass_reference() {
        // Every string up to 6 characters over an alphabet that makes every kind of trick.
        let alphabet = ['/', '.', 'a', '%', '2', 'F', '\\'];
        let mut checked = 0;
        let mut current = vec![String::new()];
        for _ in 0..6 {
            let mut next = Vec::with_capacity(current.len() * alphabet.len());
            for prefix in &current {
                for c in alphabet {
                    let mut path = prefix.clone();
                    path.push(c);
                    assert_eq!(check_path(&path), two_pass_check_path(&path), "{path:?}");
                    checked += 1;
                    next.push(path);
                }
            }
            current = next;
        }
        assert_eq!(checked, (1..=6).map(|n| 7usize.pow(n)).sum::<usize>());
    }

    #[test]
    fn prefixes_route_to_vendors() {
        assert_eq!(
            split_vendor_prefix("/stripe/v1/charges"),
            Ok((Vendor::Stripe, "/v1/charges"))
        );
        assert_eq!(
            split_vendor_prefix("/resend/emails"),
            Ok((Vendor::Resend, "/emails"))
        );
        assert_eq!(
            split_vendor_prefix("/stripe"),
            Err(PathError::UnknownPrefix)
        );
        assert_eq!(
            split_vendor_prefix("/evil.example.com/v1"),
            Err(PathError::UnknownPrefix)
        );
        assert_eq!(
            split_vendor_prefix("/STRIPE/v1"),
            Err(PathError::UnknownPrefix)
        );
    }

    #[test]
    fn templates_match_whole_segments() {
        assert!(template_matches(
            "/v1/customers/{id}",
            "/v1/customers/cus_1"
        ));
        assert!(!template_matches("/v1/customers/{id}", "/v1/customers"));
        assert!(!template_matches("/v1/customers/{id}", "/v1/customers/"));
        assert!(!template_matches(
            "/v1/customers/{id}",
            "/v1/customers/cus_1/sources"
        ));
        assert!(template_matches("/v1/charges", "/v1/charges"));
        assert!(!template_matches("/v1/charges", "/v1/charges/"));
        assert!(template_matches(
            "/2010-04-01/Accounts/{AccountSid}/Messages/{Sid}.json",
            "/2010-04-01/Accounts/AC1/Messages/SM9.json"
        ));
        assert!(!template_matches(
            "/2010-04-01/Accounts/{AccountSid}/Messages/{Sid}.json",
            "/2010-04-01/Accounts/AC1/Messages/.json"
        ));
        assert_eq!(
            template_capture("/v1/customers/{id}", "/v1/customers/cus_9", "id"),
            Some("cus_9")
        );
        assert_eq!(
            template_capture(
                "/2010-04-01/Accounts/{AccountSid}/Messages/{Sid}.json",
                "/2010-04-01/Accounts/AC1/Messages/SM9.json",
                "Sid"
            ),
            Some("SM9")
        );
    }
}
