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

/// Whether some name matches both patterns (two domains' `ees_ids` that overlap admit the
/// same EES ID, and the domain is then decided by `provId` alone).
pub fn glob_overlap(a: &str, b: &str) -> bool {
    let p: Vec<char> = a.to_ascii_lowercase().chars().collect();
    let q: Vec<char> = b.to_ascii_lowercase().chars().collect();
    // memo[i][j]: the suffixes p[i..] and q[j..] can match a common string.
    let mut memo = vec![vec![false; q.len() + 1]; p.len() + 1];
    for i in (0..=p.len()).rev() {
        for j in (0..=q.len()).rev() {
            memo[i][j] = if i == p.len() && j == q.len() {
                true
            } else if i < p.len() && p[i] == '*' {
                memo[i + 1][j] || (j < q.len() && memo[i][j + 1])
            } else if j < q.len() && q[j] == '*' {
                memo[i][j + 1] || (i < p.len() && memo[i + 1][j])
            } else {
                i < p.len() && j < q.len() && p[i] == q[j] && memo[i + 1][j + 1]
            };
        }
    }
    memo[0][0]
}

#[cfg(test)]
mod tests {
    use super::{glob_match, glob_overlap};

    #[test]
    fn overlaps() {
        assert!(glob_overlap("*.ecsp-a.example", "ees1.*"));
        assert!(glob_overlap("*", "ees1.ecsp-b.example"));
        assert!(!glob_overlap("*.ecsp-a.example", "*.ecsp-b.example"));
        assert!(glob_overlap("*.example", "*.ecsp-b.example"));
        assert!(!glob_overlap("a*", "b*"));
        assert!(glob_overlap("a*c", "*bc"));
    }

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
