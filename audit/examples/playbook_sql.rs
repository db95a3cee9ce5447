//! Prints the playbook queries as Markdown, for pasting into docs/audit.md:
//! `cargo run -q -p keybrake-audit --example playbook_sql`.
fn main() {
    for q in keybrake_audit::queries::ALL {
        println!("### {}\n", q.title);
        for p in q.params {
            println!("- `{p}`");
        }
        println!("\n```sql\n{};\n```\n", q.sql);
    }
}
