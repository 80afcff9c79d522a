//! Reading and editing a child's argument list: whether the caller already set a flag that we
//! would otherwise default, and the list without it (a restart pins the old ports).

/// Whether `args` sets `--flag` (as `--flag VALUE` or `--flag=VALUE`).
pub(crate) fn has_flag(args: &[String], flag: &str) -> bool {
    args.iter().any(|a| a == flag || a.strip_prefix(flag).is_some_and(|r| r.starts_with('=')))
}

/// `args` without `--flag VALUE` / `--flag=VALUE`.
pub(crate) fn without_flag(args: &[String], flag: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut iter = args.iter();
    while let Some(a) = iter.next() {
        if a == flag {
            iter.next();
        } else if !a.strip_prefix(flag).is_some_and(|r| r.starts_with('=')) {
            out.push(a.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_found_and_removed_in_both_spellings() {
        let args: Vec<String> =
            ["--listen", "1.2.3.4:5", "--x", "--admin=a:1", "--listener"].map(String::from).to_vec();
        assert!(has_flag(&args, "--listen"));
        assert!(has_flag(&args, "--admin"));
        assert!(!has_flag(&args, "--name"));
        assert_eq!(without_flag(&args, "--listen"), ["--x", "--admin=a:1", "--listener"]);
        assert_eq!(without_flag(&args, "--admin"), ["--listen", "1.2.3.4:5", "--x", "--listener"]);
    }
}
