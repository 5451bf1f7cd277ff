//! README.md's topic table is the one in `labvisor_protocol::topics`' `//!` doc (with the
//! rustdoc links rendered as plain code), row for row.

use std::path::PathBuf;

#[test]
fn readme_topic_table_matches_the_topics_doc() {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(manifest.join("src/topics.rs")).unwrap();
    let readme = std::fs::read_to_string(manifest.join("../README.md")).unwrap();
    // [`X`](crate::payloads::X) -> `X`
    let plain = |row: &str| {
        let mut out = String::new();
        let mut rest = row;
        while let Some(i) = rest.find("[`") {
            out.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            let Some(j) = after.find("`](") else {
                out.push_str(&rest[i..]);
                return out;
            };
            out.push_str(&after[..j + 1]);
            let tail = &after[j + 3..];
            rest = &tail[tail.find(')').map_or(0, |k| k + 1)..];
        }
        out.push_str(rest);
        out
    };
    let rows: Vec<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("//! "))
        .filter(|l| l.starts_with("| `"))
        .map(plain)
        .collect();
    assert!(rows.len() >= 10, "the topics doc has its table");
    let missing: Vec<&String> = rows
        .iter()
        .filter(|r| !readme.lines().any(|l| l == r.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md lacks or differs in these topic rows (see protocol/src/topics.rs):\n{}",
        missing
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}
