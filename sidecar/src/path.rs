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

/// A path that passed [`check_path`], with the one fact the operation matcher needs from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckedPath<'a> {
    path: &'a str,
    slashes: usize,
}

impl<'a> CheckedPath<'a> {
    pub fn as_str(&self) -> &'a str {
        self.path
    }

    /// How many `/` the path holds (a `{name}` placeholder never spans one, so only templates
    /// with as many can match).
    pub fn slashes(&self) -> usize {
        self.slashes
    }
}

/// Checks that `path` (without the query) is a plain absolute path: no empty, `.` or `..`
/// segments, no percent-encoded `/`, `\`, `.`, `%` or NUL, no backslashes or control characters.
/// A single trailing slash is allowed (it simply will not match templates without one).
pub fn check_path(path: &str) -> Result<(), PathError> {
    checked_path(path).map(|_| ())
}

/// What [`checked_path`] does with each byte: most are plain and cost one table lookup.
const PLAIN: u8 = 0;
const SLASH: u8 = 1;
const PERCENT: u8 = 2;
const FORBIDDEN: u8 = 3;

static BYTE_CLASS: [u8; 256] = {
    let mut class = [PLAIN; 256];
    let mut b = 0;
    while b < 0x20 {
        class[b] = FORBIDDEN;
        b += 1;
    }
    class[0x7f] = FORBIDDEN;
    class[b'\\' as usize] = FORBIDDEN;
    class[b'/' as usize] = SLASH;
    class[b'%' as usize] = PERCENT;
    class
};

/// [`check_path`], counting the path's slashes on the way (one pass over the bytes).
pub fn checked_path(path: &str) -> Result<CheckedPath<'_>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotOriginForm);
    }
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
    let mut slashes = 0;
    for (i, &b) in bytes.iter().enumerate() {
        match BYTE_CLASS[usize::from(b)] {
            PLAIN => {}
            SLASH => {
                slashes += 1;
                if i > 0 && i < segments_end && segment_error.is_none() {
                    segment_error = segment_problem(&bytes[segment_start..i]);
                    segment_start = i + 1;
                }
            }
            PERCENT => check_escape(bytes, i)?,
            _ => return Err(PathError::ForbiddenCharacter),
        }
    }
    if segments_end > 1 && segment_error.is_none() {
        segment_error = segment_problem(&bytes[segment_start..segments_end]);
    }
    match segment_error {
        Some(e) => Err(e),
        None => Ok(CheckedPath { path, slashes }),
    }
}

/// The `%XY` escape at `at`: refused when malformed or when it encodes a separator or a
/// character that could become one after decoding (`/`, `\\`, `.`, `%`, NUL).
fn check_escape(bytes: &[u8], at: usize) -> Result<(), PathError> {
    let hex = bytes.get(at + 1..at + 3).ok_or(PathError::EncodedTrick)?;
    let decoded = std::str::from_utf8(hex)
        .ok()
        .and_then(|h| u8::from_str_radix(h, 16).ok())
        .ok_or(PathError::EncodedTrick)?;
    if matches!(decoded, b'/' | b'\\' | b'.' | b'%' | 0) {
        return Err(PathError::EncodedTrick);
    }
    Ok(())
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
    // A byte scan: the prefix is a few bytes, shorter than a `str::find` gets going in.
    let (name, tail_start) = match rest.bytes().position(|b| b == b'/') {
        Some(i) => (&rest[..i], i + 1),
        None => return Err(PathError::UnknownPrefix),
    };
    let vendor = Vendor::parse(name).ok_or(PathError::UnknownPrefix)?;
    // Keep the leading '/' of the remainder.
    Ok((vendor, &path[tail_start..]))
}

/// Does `path` match `template`? `{name}` matches exactly one non-empty segment; a segment such
/// as `{Sid}.json` matches a non-empty prefix followed by the literal suffix. No allocation.
/// Runs for every allow rule with a template on every call.
pub fn template_matches(template: &str, path: &str) -> bool {
    template_matches_from(template.as_bytes(), path.as_bytes(), 0)
}

/// [`template_matches`] for a `path` already known to start with `template[..start]`, which
/// holds no `{` (a catalogue operation's literal prefix): the walk starts there.
///
/// One walk over both: literal text is compared byte by byte (so the `/`s line up as they go);
/// a `{` that opens a template segment and closes within it is a placeholder, matched against
/// the path's segment at the same place.
pub(crate) fn template_matches_from(template: &[u8], path: &[u8], start: usize) -> bool {
    let (mut t, mut p) = (start, start);
    while t < template.len() {
        let at_segment_start = t == 0 || template[t - 1] == b'/';
        if template[t] == b'{'
            && at_segment_start
            && let Some((close, end)) = placeholder_at(&template[t..])
        {
            let suffix = &template[t + close + 1..t + end];
            let segment_len = path[p..]
                .iter()
                .position(|b| *b == b'/')
                .unwrap_or(path.len() - p);
            let segment = &path[p..p + segment_len];
            if segment.len() <= suffix.len() || !segment.ends_with(suffix) {
                return false;
            }
            (t, p) = (t + end, p + segment_len);
            continue;
        }
        if path.get(p) != Some(&template[t]) {
            return false;
        }
        t += 1;
        p += 1;
    }
    p == path.len()
}

/// For a template segment starting with `{`: where its `}` is and where the segment ends, or
/// `None` when it does not close within the segment (then it is literal text).
fn placeholder_at(segment: &[u8]) -> Option<(usize, usize)> {
    for (i, &b) in segment.iter().enumerate() {
        match b {
            b'}' => {
                let end = segment[i..]
                    .iter()
                    .position(|b| *b == b'/')
                    .map_or(segment.len(), |rest| i + rest);
                return Some((i, end));
            }
            b'/' => return None,
            _ => {}
        }
    }
    None
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

    /// The two-pass check this module used before the one-pass one, kept as the reference for
    /// the order of checks and the segment rules (escapes are judged by the shared `check_escape`).
    fn two_pass_check_path(path: &str) -> Result<(), PathError> {
        let rest = path.strip_prefix('/').ok_or(PathError::NotOriginForm)?;
        let bytes = path.as_bytes();
        for (i, &b) in bytes.iter().enumerate() {
            if b == b'\\' || b < 0x20 || b == 0x7f {
                return Err(PathError::ForbiddenCharacter);
            }
            if b == b'%' {
                check_escape(bytes, i)?;
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
    fn checked_paths_count_their_slashes() {
        for path in [
            "/",
            "/v1/charges",
            "/v1/charges/",
            "/v1/customers/a%40b",
            "//",
        ] {
            let checked = checked_path(path).unwrap();
            assert_eq!(checked.as_str(), path);
            assert_eq!(checked.slashes(), path.matches('/').count(), "{path}");
        }
        assert_eq!(checked_path("/v1//x"), Err(PathError::EmptySegment));
    }

    /// The segment-by-segment matcher this module used before the one-walk one, kept as the
    /// reference.
    fn segmentwise_template_matches(template: &str, path: &str) -> bool {
        let (t, p): (Vec<&str>, Vec<&str>) =
            (template.split('/').collect(), path.split('/').collect());
        t.len() == p.len()
            && t.iter().zip(&p).all(|(t, p)| {
                if let Some(inner) = t.strip_prefix('{')
                    && let Some(close) = inner.find('}')
                {
                    let suffix = &inner[close + 1..];
                    return p.len() > suffix.len() && p.ends_with(suffix);
                }
                t == p
            })
    }

    #[test]
    fn one_walk_template_match_agrees_with_the_segmentwise_reference() {
        // Templates and paths up to 5 characters over an alphabet that makes placeholders,
        // unclosed braces, suffixes and empty segments; each pair compared.
        let strings = |alphabet: &[char], max: usize| {
            let mut all = vec![String::new()];
            let mut current = vec![String::new()];
            for _ in 0..max {
                let mut next = Vec::new();
                for prefix in &current {
                    for c in alphabet {
                        let mut s = prefix.clone();
                        s.push(*c);
                        next.push(s);
                    }
                }
                all.extend(next.iter().cloned());
                current = next;
            }
            all
        };
        let templates = strings(&['/', '{', '}', 'a', 'j'], 5);
        let paths = strings(&['/', 'a', 'j', 'x'], 5);
        let mut matched = 0;
        for template in &templates {
            // The literal prefix a catalogue index would start from: text before the first `{`.
            let start = template.find('{').unwrap_or(template.len());
            for path in &paths {
                let expected = segmentwise_template_matches(template, path);
                assert_eq!(
                    template_matches(template, path),
                    expected,
                    "{template} {path}"
                );
                if path.as_bytes().starts_with(&template.as_bytes()[..start]) {
                    assert_eq!(
                        template_matches_from(template.as_bytes(), path.as_bytes(), start),
                        expected,
                        "{template} {path} from {start}"
                    );
                }
                matched += usize::from(expected);
            }
        }
        assert!(matched > 1000, "the alphabet makes matches too: {matched}");
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
