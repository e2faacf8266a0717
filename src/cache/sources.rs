//! Where to fetch a NAR from, as a pure function: the upstream its narinfo came from first,
//! then the same name on the other upstreams; what failed recently goes last.

use crate::nix::NarName;

/// The URLs to try for NAR `name`, in order.
///
/// - `recorded`: the absolute URL its narinfo gave (empty for uploads). It is used only while
///   its upstream is still configured: an upstream the operator removed (broken, untrusted)
///   is never asked again.
/// - `bases`: the configured upstreams, in priority order.
/// - `failed`: whether a URL failed recently. An upstream that just served a bad or broken NAR
///   is likely to serve the next one badly too: its URLs go after the others', and a failed URL
///   itself goes last.
pub fn nar_candidates(recorded: &str, name: &NarName, bases: &[&str], failed: &dyn Fn(&str) -> bool) -> Vec<String> {
    let on_a_base = |url: &str| bases.iter().any(|b| url.strip_prefix(b).is_some_and(|rest| rest.starts_with('/')));
    let mut urls: Vec<String> = Some(recorded).filter(|u| !u.is_empty() && on_a_base(u)).map(String::from).into_iter().collect();
    for b in bases {
        let url = format!("{b}/nar/{name}");
        if !urls.contains(&url) {
            urls.push(url);
        }
    }
    let failed_bases: Vec<&str> = bases
        .iter()
        .copied()
        .filter(|b| urls.iter().any(|u| failed(u) && u.starts_with(&format!("{b}/"))))
        .collect();
    let failed_flags: Vec<(bool, bool)> = urls
        .iter()
        .map(|u| (failed(u), failed_bases.iter().any(|b| u.starts_with(&format!("{b}/")))))
        .collect();
    let mut order: Vec<usize> = (0..urls.len()).collect();
    order.sort_by_key(|&i| failed_flags[i]);
    order.into_iter().map(|i| urls[i].clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name() -> NarName {
        NarName::parse(&format!("{}.nar.xz", "1".repeat(52))).unwrap()
    }

    #[test]
    fn the_recorded_upstream_comes_first_then_the_others_in_order() {
        let n = name();
        let urls = nar_candidates("http://b/x/blob", &n, &["http://a", "http://b"], &|_| false);
        assert_eq!(urls, vec!["http://b/x/blob".to_string(), format!("http://a/nar/{n}"), format!("http://b/nar/{n}")]);
    }

    #[test]
    fn an_upstream_no_longer_configured_is_never_asked() {
        let n = name();
        let urls = nar_candidates("http://removed/nar/x.nar", &n, &["http://a"], &|_| false);
        assert_eq!(urls, vec![format!("http://a/nar/{n}")]);
        // A prefix of a configured URL is not that upstream.
        let urls = nar_candidates("http://a.evil/nar/x.nar", &n, &["http://a"], &|_| false);
        assert_eq!(urls, vec![format!("http://a/nar/{n}")]);
    }

    #[test]
    fn what_failed_recently_goes_last_and_its_upstream_after_the_others() {
        let n = name();
        let recorded = format!("http://a/nar/{n}");
        let failed = recorded.clone();
        let urls = nar_candidates(&recorded, &n, &["http://a", "http://b", "http://c"], &|u| u == failed);
        assert_eq!(urls, vec![format!("http://b/nar/{n}"), format!("http://c/nar/{n}"), recorded]);
    }

    #[test]
    fn uploads_have_no_recorded_url() {
        let n = name();
        assert_eq!(nar_candidates("", &n, &["http://a"], &|_| false), vec![format!("http://a/nar/{n}")]);
    }
}
