//! The table of policy documents in `testdata/policy.txt`, for the tests of
//! the store and of every proxy: each side must agree with the table, so no
//! side can accept what another refuses.

use serde_json::Value;

/// One document of the table and the verdict it must get.
#[derive(Debug, Clone)]
pub struct Case {
    /// Line in `testdata/policy.txt`, for failure messages.
    pub line: usize,
    /// `kind`.
    pub kind: String,
    /// `metadata.name`.
    pub name: String,
    /// `spec`.
    pub spec: Value,
    /// `None`: accepted. `Some((field, words))`: refused, naming `field`,
    /// with `words` somewhere in the reason.
    pub refused: Option<(String, String)>,
}

/// Every case of the table.
pub fn all() -> Vec<Case> {
    let text = include_str!("../../testdata/policy.txt");
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let cols: Vec<&str> = line.split(" | ").map(str::trim).collect();
        let spec = serde_json::from_str(cols.get(3).copied().unwrap_or_default())
            .unwrap_or_else(|e| panic!("testdata/policy.txt:{line_no}: spec: {e}"));
        let refused = match (cols[0], cols.len()) {
            ("accept", 4) => None,
            ("refuse", 6) => Some((cols[4].to_owned(), cols[5].to_owned())),
            _ => panic!(
                "testdata/policy.txt:{line_no}: not `accept | 4 columns` or `refuse | 6 columns`"
            ),
        };
        out.push(Case {
            line: line_no,
            kind: cols[1].to_owned(),
            name: cols[2].to_owned(),
            spec,
            refused,
        });
    }
    out
}
