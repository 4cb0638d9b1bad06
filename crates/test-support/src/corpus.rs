//! The bad-input corpus: each hostile or invalid input a test tries is recorded with what
//! happened, one line per case in `target/corpus/cases.tsv`; `make reliability` turns the lines
//! into the table of `docs/reliability.md`.

use std::io::Write;

/// Records `case` and its `outcome` (both one line).
pub fn record(case: &str, outcome: &str) {
    let dir = super::repo_root().join("target/corpus");
    std::fs::create_dir_all(&dir).expect("corpus folder");
    let line = format!("{}\t{}\n", one_line(case), one_line(outcome));
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("cases.tsv"))
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .expect("record a corpus case");
}

fn one_line(text: &str) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out: String = flat.chars().take(300).collect();
    if flat.chars().count() > 300 {
        out.push('…');
    }
    out.replace('|', "\\|")
}
