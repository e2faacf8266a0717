//! End-to-end specification of who may read and write, and what ncps will vouch for:
//! uploads (who may send them, and that they never replace or shadow what upstreams serve),
//! read tokens (as Nix sends them from a netrc file), credentials for private upstreams (sent
//! only to their origin, never shown), and upstream redirects (never to another origin).
//!
//! Run: `cargo test --test e2e access::` (add `-- --nocapture` for timings).

use crate::support::*;

// ---------------------------------------------------------------------------
// Redirects from upstreams
// ---------------------------------------------------------------------------

/// An upstream that answers every request with a redirect to another origin (which has
/// everything): ncps does not follow, the other origin is never asked, the log says where
/// the redirect pointed and which upstream sent it.
fn a_redirect_to_another_origin_is_not_followed(client: NixClient) {
    let Some(fx) = fixture_or_skip() else { return };
    if client.must_skip() {
        return;
    }
    let elsewhere = Upstream::for_cache(fx, Compression::Xz);
    let up = Upstream::for_cache(fx, Compression::Xz);
    up.set_mode(Mode::RedirectTo(elsewhere.port()));
    let ncps = Ncps::for_upstreams(&[up.url()], &fx.up1_public_key);
    let err = client.copy_from(&ncps.url(), &[&fx.top], &ncps.pubkey()).expect_err("nothing comes from elsewhere");
    assert!(!err.contains("hash mismatch"), "a clean failure: {err}");
    assert_eq!(elsewhere.total_hits(), 0, "the other origin was asked: {:?}", elsewhere.requests());
    let log = ncps.log();
    let pointed = format!("redirected to another origin ({}/", elsewhere.url());
    assert!(
        log.lines().any(|l| l.contains(&pointed) && l.contains(&format!("upstream {}", up.url()))),
        "a log line names the upstream and where it pointed:\n{log}"
    );
    assert!(ncps.stored_narinfo_files().is_empty() && ncps.stored_nar_files().is_empty());
}

#[test]
fn an_upstream_redirecting_to_another_origin_is_not_followed_and_the_log_says_so() {
    a_redirect_to_another_origin_is_not_followed(NixClient::Nix2_8);
}

#[test]
fn nix_2_26_an_upstream_redirecting_to_another_origin_is_not_followed_and_the_log_says_so() {
    a_redirect_to_another_origin_is_not_followed(NixClient::Nix2_26);
}

#[test]
fn same_origin_redirects_are_followed_and_the_log_names_the_url_that_answered() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    up.set_mode(Mode::RedirectSameOrigin);
    let ncps = Ncps::for_upstreams(&[up.url()], &fx.up1_public_key);
    nix_copy_from(&ncps.url(), &[&fx.top], &ncps.pubkey()).expect("the closure, through same-origin redirects");
    let answered = format!("answered by {}/mirror/", up.url());
    let log = ncps.wait_for_log(0, &answered, std::time::Duration::from_secs(2));
    assert!(log.contains(&format!("{answered}{}.narinfo", store_hash(&fx.top))), "{log}");
    assert!(up.hits_where(|p| p.starts_with("/mirror/nar/")) > 0, "NARs came through the redirect too");
}
