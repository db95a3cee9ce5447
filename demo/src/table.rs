//! Aligned plain-text tables (what a terminal screenshot wants), with long results elided in
//! the middle.

/// Renders `headers` and `rows` as columns separated by two spaces. Cells that look numeric
/// (digits, `.`, `-`) are right-aligned. With `max_rows`, only the first and last rows are
/// shown and a `… N more rows …` line stands in for the rest.
pub fn render(headers: &[&str], rows: &[Vec<String>], max_rows: Option<usize>) -> String {
    let shown: Vec<Option<&Vec<String>>> = match max_rows {
        Some(max) if rows.len() > max && max >= 2 => {
            let head = max / 2;
            let tail = max - head;
            rows[..head]
                .iter()
                .map(Some)
                .chain(std::iter::once(None))
                .chain(rows[rows.len() - tail..].iter().map(Some))
                .collect()
        }
        _ => rows.iter().map(Some).collect(),
    };
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in shown.iter().flatten() {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let numeric: Vec<bool> = (0..headers.len())
        .map(|i| {
            let mut cells = rows.iter().filter_map(|r| r.get(i)).peekable();
            cells.peek().is_some() && cells.all(|c| looks_numeric(c))
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let w = widths[i];
                if numeric[i] {
                    format!("{c:>w$}")
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect();
        text.join("  ").trim_end().to_owned()
    };
    let mut out = vec![line(headers.to_vec())];
    out.push(line(
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect(),
    ));
    for row in shown {
        match row {
            Some(r) => out.push(line(r.iter().map(String::as_str).collect())),
            None => out.push(format!(
                "… {} more rows …",
                rows.len() - max_rows.unwrap_or(0)
            )),
        }
    }
    out.join("\n")
}

fn looks_numeric(cell: &str) -> bool {
    !cell.is_empty()
        && cell
            .chars()
            .all(|c| c.is_ascii_digit() || c == '.' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize) -> Vec<Vec<String>> {
        (0..n)
            .map(|i| vec![format!("cus_{i}"), format!("{}.50", i * 10)])
            .collect()
    }

    #[test]
    fn aligns_columns_and_right_aligns_numbers() {
        let text = render(&["customer", "usd"], &rows(3), None);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "customer    usd");
        assert_eq!(lines[1], "--------  -----");
        assert_eq!(lines[2], "cus_0      0.50");
        assert_eq!(lines[4], "cus_2     20.50");
    }

    #[test]
    fn elides_the_middle_of_long_results() {
        let text = render(&["customer", "usd"], &rows(10), Some(4));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2 + 4 + 1);
        assert!(lines[2].starts_with("cus_0"));
        assert_eq!(lines[4], "… 6 more rows …");
        assert!(lines[6].starts_with("cus_9"));
    }

    #[test]
    fn short_results_are_not_elided() {
        let text = render(&["customer", "usd"], &rows(4), Some(4));
        assert!(!text.contains('…'));
        assert_eq!(text.lines().count(), 6);
    }
}
