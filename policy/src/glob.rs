//! `ees_ids` patterns: `*` matches any run of characters (dots included), everything else
//! matches itself, case-insensitively (EES IDs are usually FQDNs).

/// Whether `name` matches `pattern`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.to_ascii_lowercase().chars().collect();
    let n: Vec<char> = name.to_ascii_lowercase().chars().collect();
    // Iterative matcher with one backtrack point: linear in practice, never exponential.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn contract_patterns() {
        assert!(glob_match("*.ecsp-a.example", "ees1.edn1.ecsp-a.example"));
        assert!(glob_match("*.ecsp-a.example", "EES1.ecsp-a.example"));
        assert!(!glob_match("*.ecsp-a.example", "ecsp-a.example"));
        assert!(!glob_match("*.ecsp-a.example", "ees1.ecsp-a.example.evil"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("ees?", "ees?"));
        assert!(!glob_match("ees1", "ees2"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
    }
}
