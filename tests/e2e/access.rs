//! End-to-end specification of who may read and write, and what ncps will vouch for:
//! uploads (who may send them, and that they never replace or shadow what upstreams serve),
//! read tokens (as Nix sends them from a netrc file), credentials for private upstreams (sent
//! only to their origin, never shown), and upstream redirects (never to another origin).
//!
//! Run: `cargo test --test e2e access::` (add `-- --nocapture` for timings).

use crate::support::*;
use std::time::Duration;

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

// ---------------------------------------------------------------------------
// Uploads
// ---------------------------------------------------------------------------

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A raw PUT, with `Authorization: Bearer <token>` if a token is given.
fn put(ncps: &Ncps, path: &str, body: &[u8], token: Option<&str>) -> RawResponse {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let mut req = format!(
        "PUT {path} HTTP/1.1\r\nHost: ncps-e2e\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    raw_request(ncps.addr, &req, std::time::Duration::from_secs(10)).unwrap_or_else(|e| panic!("PUT {path}: {e}"))
}

/// An upstream with nothing in it: every fixture path is one no upstream serves.
fn empty_upstream() -> (TempDir, Upstream) {
    let dir = TempDir::new("empty-upstream");
    std::fs::write(dir.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
    let up = Upstream::serve_dir(dir.path());
    (dir, up)
}

fn an_upload_without_the_write_token_is_refused(client: NixClient) {
    let Some(fx) = fixture_or_skip() else { return };
    if client.must_skip() {
        return;
    }
    let (_d, up) = empty_upstream();
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &["--cache-allow-put-verb", "--cache-write-token", WRITE_TOKEN]);
    let paths = vec![fx.many[0].clone()];
    let e = client.copy_to(&ncps.url(), &paths).expect_err("an upload without the token");
    assert!(e.contains("401"), "{}: refused with 401: {e}", client.label());
    let wrong = ClientAuth { netrc: Some(netrc_for("not-the-token")), ..ClientAuth::default() };
    let e = client.copy_to_with(&format!("{}/upload", ncps.url()), &paths, &wrong).expect_err("a wrong token");
    assert!(e.contains("401"), "{}: refused with 401: {e}", client.label());
    assert!(ncps.stored_narinfo_files().is_empty() && ncps.stored_nar_files().is_empty(), "nothing stored");
    ncps.wait_for_log(0, "refused: no token presented", Duration::from_secs(5));
}

#[test]
fn an_upload_without_the_write_token_is_refused_with_401_and_nothing_is_stored() {
    an_upload_without_the_write_token_is_refused(NixClient::Nix2_8);
}

#[test]
fn nix_2_26_an_upload_without_the_write_token_is_refused_with_401_and_nothing_is_stored() {
    an_upload_without_the_write_token_is_refused(NixClient::Nix2_26);
}

/// Anonymous uploads with `--cache-require-trusted-signature` (Go ncps's model): one signed by
/// the trusted upload key is taken and re-signed by ncps; one signed by another key is 403.
fn trusted_signatures_decide_what_is_taken_and_re_signed(client: NixClient) {
    let Some(fx) = fixture_or_skip() else { return };
    if client.must_skip() {
        return;
    }
    let (_k1, trusted, trusted_secret) = new_key_pair("builder.example.org-1");
    let (_k2, _, other_secret) = new_key_pair("stranger.example.org-1");
    let (_d, up) = empty_upstream();
    let ncps = Ncps::for_upstreams_with(
        &[up.url()],
        &[&fx.up1_public_key],
        &["--cache-allow-put-verb", "--cache-require-trusted-signature", "--cache-trusted-upload-key", &trusted],
    );
    let key = ncps.pubkey();
    let (good, bad) = (vec![fx.many[2].clone()], vec![fx.many[3].clone()]);
    let signed_by = |secret: &std::path::Path| ClientAuth { secret_key_file: Some(secret.to_path_buf()), ..ClientAuth::default() };
    client.copy_to_with(&ncps.url(), &good, &signed_by(&trusted_secret)).unwrap_or_else(|e| panic!("{}: {e}", client.label()));
    let ni = NarInfo::parse(&ncps.get(&format!("/{}.narinfo", store_hash(&good[0]))).text());
    let ours: Vec<String> = ni.sigs().into_iter().filter(|s| s.starts_with(&format!("{HOSTNAME}:"))).collect();
    assert!(ours.len() == 1 && signature_verifies(&key, &ni.fingerprint(), &ours[0]), "re-signed by ncps: {:?}", ni.sigs());
    client.copy_from(&ncps.url(), &good, &key).expect("the upload, trusting only ncps's key");

    let e = client.copy_to_with(&ncps.url(), &bad, &signed_by(&other_secret)).expect_err("another key's upload");
    assert!(e.contains("403"), "{}: refused with 403: {e}", client.label());
    assert_eq!(ncps.get(&format!("/{}.narinfo", store_hash(&bad[0]))).status, 404, "not stored");
    ncps.wait_for_log(0, "no signature by a --cache-trusted-upload-key", Duration::from_secs(5));
}

#[test]
fn an_upload_signed_by_a_trusted_upload_key_is_re_signed_and_one_signed_by_another_key_is_refused() {
    trusted_signatures_decide_what_is_taken_and_re_signed(NixClient::Nix2_8);
}

#[test]
fn nix_2_26_an_upload_signed_by_a_trusted_upload_key_is_re_signed_and_one_signed_by_another_key_is_refused() {
    trusted_signatures_decide_what_is_taken_and_re_signed(NixClient::Nix2_26);
}

#[test]
fn with_only_a_write_token_uploads_are_kept_but_never_signed_by_ncps() {
    let Some(fx) = fixture_or_skip() else { return };
    let (_d, up) = empty_upstream();
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &["--cache-allow-put-verb", "--cache-write-token", WRITE_TOKEN]);
    let paths = vec![fx.many[4].clone()];
    let auth = ClientAuth { netrc: Some(netrc_for(WRITE_TOKEN)), ..ClientAuth::default() };
    nix_client_copy_to(&ncps.url(), &paths, &auth).expect("nix copy --to with the token in a netrc file");
    let r = ncps.get(&format!("/{}.narinfo", store_hash(&paths[0])));
    assert_eq!(r.status, 200, "stored");
    let sigs = NarInfo::parse(&r.text()).sigs();
    assert!(sigs.iter().all(|s| !s.starts_with(&format!("{HOSTNAME}:"))), "a token lets one store, not have ncps vouch: {sigs:?}");
    nix_copy_from(&ncps.url(), &paths, &ncps.pubkey()).expect_err("nothing signed by ncps to trust");
    ncps.wait_for_log(0, "this cache signs none", Duration::from_secs(5));
}

fn nix_client_copy_to(url: &str, paths: &[String], auth: &ClientAuth) -> Result<(), String> {
    NixClient::Nix2_8.copy_to_with(url, paths, auth)
}

/// Neither a path ncps holds from a verified upstream nor one an upstream serves (not fetched
/// yet) can be taken by an upload, even one signed by a trusted upload key.
fn uploads_neither_replace_nor_shadow(client: NixClient) {
    let Some(fx) = fixture_or_skip() else { return };
    if client.must_skip() {
        return;
    }
    let (_k, uploader, uploader_secret) = new_key_pair("builder.example.org-1");
    let up = Upstream::for_cache(fx, Compression::Xz);
    let ncps = Ncps::for_upstreams_with(
        &[up.url()],
        &[&fx.up1_public_key],
        &["--cache-allow-put-verb", "--cache-write-token", WRITE_TOKEN, "--cache-trusted-upload-key", &uploader],
    );
    let key = ncps.pubkey();
    // Held: lib, fetched through ncps. An attacker's narinfo for it, pointing at other bytes
    // (another path's NAR, uploaded first, which is fine: a NAR is only its bytes).
    client.copy_from(&ncps.url(), &[&fx.lib], &key).expect("lib through ncps");
    let lib_url = format!("/{}.narinfo", store_hash(&fx.lib));
    let before = ncps.get(&lib_url).text();
    let other_nar_path = upstream_nar_path(fx, Compression::Xz, &fx.many[5]);
    let other_nar = std::fs::read(fx.cache_dir(Compression::Xz).join(&other_nar_path[1..])).unwrap();
    assert_eq!(put(&ncps, &other_nar_path, &other_nar, Some(WRITE_TOKEN)).status, 204, "a NAR is only its bytes");
    let other = NarInfo::parse(&fx.upstream_narinfo(Compression::Xz, &fx.many[5]));
    let forged: String = fx
        .upstream_narinfo(Compression::Xz, &fx.lib)
        .lines()
        .filter(|l| !l.starts_with("Sig:"))
        .map(|l| match l.split_once(": ").map(|(k, _)| k) {
            Some(k @ ("URL" | "FileHash" | "FileSize" | "NarHash" | "NarSize")) => format!("{k}: {}\n", other.get(k).unwrap()),
            _ => format!("{l}\n"),
        })
        .collect();
    let sig = sign_with_key_file(&uploader_secret, &NarInfo::parse(&forged).fingerprint());
    let forged = format!("{forged}Sig: {sig}\n");
    for path in [lib_url.clone(), format!("/upload{lib_url}")] {
        let r = put(&ncps, &path, forged.as_bytes(), Some(WRITE_TOKEN));
        assert_eq!(r.status, 409, "PUT {path} for a held path: {}", r.text());
    }
    assert_eq!(ncps.get(&lib_url).text(), before, "the verified narinfo is untouched");

    // Served upstream, not fetched yet: big and top (lib is held, so Nix skips it). Under
    // /upload Nix asks only the local cache, so it tries to upload them; ncps asks upstream.
    let e = client
        .copy_to_with(&format!("{}/upload", ncps.url()), std::slice::from_ref(&fx.top), &ClientAuth {
            netrc: Some(netrc_for(WRITE_TOKEN)),
            secret_key_file: Some(uploader_secret.clone()),
        })
        .expect_err("an upload for paths an upstream serves");
    // 409; or 503 if, on a loaded machine, an upstream lookup timed out (then ncps cannot
    // tell, and refuses too).
    assert!(e.contains("409") || e.contains("503"), "{}: refused with 409: {e}", client.label());
    // Log lines are buffered for ~50 ms: wait for the reason rather than read at once.
    let says_why = |log: &str| log.contains("an upload may not stand for it") || log.contains("cannot tell whether an upstream");
    assert!(wait_until(Duration::from_secs(5), || says_why(&ncps.log())), "the log says why:\n{}", ncps.log());
    // What ncps serves for them is the upstream's, verified: Nix gets the closure and it
    // verifies against up1's signatures too.
    client.copy_from(&ncps.url(), &[&fx.top], &fx.up1_public_key).expect("the upstream's closure, signed by up1");
    for p in [&fx.top, &fx.lib] {
        let ni = NarInfo::parse(&ncps.get(&format!("/{}.narinfo", store_hash(p))).text());
        let upstream = NarInfo::parse(&fx.upstream_narinfo(Compression::Xz, p));
        assert_eq!(ni.get("NarHash"), upstream.get("NarHash"), "{p}: the upstream's");
    }
}

#[test]
fn an_upload_neither_replaces_a_verified_upstream_entry_nor_shadows_a_path_an_upstream_serves() {
    uploads_neither_replace_nor_shadow(NixClient::Nix2_8);
}

#[test]
fn nix_2_26_an_upload_neither_replaces_a_verified_upstream_entry_nor_shadows_a_path_an_upstream_serves() {
    uploads_neither_replace_nor_shadow(NixClient::Nix2_26);
}

// ---------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------

const GET_TOKEN: &str = "e2e-get-token-51be02";

fn reads_need_the_get_token(client: NixClient) {
    let Some(fx) = fixture_or_skip() else { return };
    if client.must_skip() {
        return;
    }
    let up = Upstream::for_cache(fx, Compression::Xz);
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &["--cache-get-token", GET_TOKEN, "--prometheus-enabled"]);
    let r = ncps.get("/pubkey");
    assert_eq!(r.status, 401);
    let key = http_request_with("GET", &format!("{}/pubkey", ncps.url()), &[("Authorization", &format!("Bearer {GET_TOKEN}"))])
        .unwrap()
        .text()
        .trim()
        .to_string();
    let e = client.copy_from(&ncps.url(), &[&fx.top], &key).expect_err("no token");
    // Nix 2.8 reports the 401 on /nix-cache-info as "does not appear to be a binary cache".
    assert!(e.contains("401") || e.contains("does not appear to be a binary cache"), "{}: {e}", client.label());
    ncps.wait_for_log(0, "GET /nix-cache-info: refused: no token presented", Duration::from_secs(5));
    client
        .copy_from_with_netrc(&ncps.url(), &[&fx.top], &key, &netrc_for(GET_TOKEN))
        .unwrap_or_else(|e| panic!("{}: with the token in a netrc file: {e}", client.label()));
}

#[test]
fn reads_with_the_get_token_from_a_netrc_file_work_and_without_it_get_401() {
    reads_need_the_get_token(NixClient::Nix2_8);
}

#[test]
fn nix_2_26_reads_with_the_get_token_from_a_netrc_file_work_and_without_it_get_401() {
    reads_need_the_get_token(NixClient::Nix2_26);
}

#[test]
fn a_401_says_how_to_configure_nix_and_healthz_and_metrics_stay_open() {
    let (_d, up) = empty_upstream();
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[SOME_VALID_PUBLIC_KEY], &["--cache-get-token", GET_TOKEN, "--prometheus-enabled"]);
    for open in ["/healthz", "/metrics"] {
        assert_eq!(ncps.get(open).status, 200, "{open} needs no token");
    }
    let hash = "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr";
    for path in ["/", "/nix-cache-info", &format!("/{hash}.narinfo")] {
        let r = ncps.get(path);
        assert_eq!(r.status, 401, "GET {path} without the token");
        let challenges: Vec<&str> = r.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case("www-authenticate")).map(|(_, v)| v.as_str()).collect();
        assert!(challenges.contains(&"Basic realm=\"ncps\""), "{challenges:?}");
        assert!(r.text().contains("machine 127.0.0.1") && r.text().contains("netrc-file"), "{}", r.text());
    }
    let with = |auth: &str| http_request_with("GET", &format!("{}/", ncps.url()), &[("Authorization", auth)]).unwrap();
    assert_eq!(with(&format!("Bearer {GET_TOKEN}")).status, 200);
    assert_eq!(with(&format!("Basic {}", b64(&format!("anyone:{GET_TOKEN}")))).status, 200, "as Nix sends a netrc entry");
    assert_eq!(with("Bearer wrong").status, 401);
    let page = with(&format!("Bearer {GET_TOKEN}")).text();
    assert!(!page.contains(GET_TOKEN), "the status page never shows the token");
}

// ---------------------------------------------------------------------------
// Private upstreams
// ---------------------------------------------------------------------------

fn a_private_upstream_through_a_netrc_file(client: NixClient) {
    let Some(fx) = fixture_or_skip() else { return };
    if client.must_skip() {
        return;
    }
    let up = Upstream::for_cache(fx, Compression::Xz);
    up.require_authorization(Some(&format!("Basic {}", b64("reader:upstream-pw-93f1"))));
    let netrc = TempDir::new("netrc");
    std::fs::write(netrc.join("netrc"), "machine 127.0.0.1\n  login reader\n  password upstream-pw-93f1\n").unwrap();
    let netrc_file = netrc.join("netrc").to_string_lossy().into_owned();
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &["--netrc-file", &netrc_file]);
    client.copy_from(&ncps.url(), &[&fx.top], &ncps.pubkey()).unwrap_or_else(|e| panic!("{}: {e}", client.label()));
    ncps.wait_for_log(0, &format!("credentials for upstream {}", up.url()), Duration::from_secs(5));

    // Without the netrc: the upstream says 401, and nothing is served.
    let plain = Ncps::for_upstreams(&[up.url()], &fx.up1_public_key);
    let r = plain.get(&format!("/{}.narinfo", store_hash(&fx.many[6])));
    assert_ne!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("401") || plain.log().contains("401"), "{}\n{}", r.text(), plain.log());
}

#[test]
fn a_private_upstream_that_requires_basic_auth_is_used_through_a_netrc_file() {
    a_private_upstream_through_a_netrc_file(NixClient::Nix2_8);
}

#[test]
fn nix_2_26_a_private_upstream_that_requires_basic_auth_is_used_through_a_netrc_file() {
    a_private_upstream_through_a_netrc_file(NixClient::Nix2_26);
}

#[test]
fn an_upstream_bearer_token_goes_to_that_upstream_only_and_no_credential_shows_in_the_log_metrics_or_status_page() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    let bearer = "upstream-bearer-c0ffee";
    up.require_authorization(Some(&format!("Bearer {bearer}")));
    // A second upstream that has nothing, and a third origin the first one redirects some
    // requests to: neither may see the token.
    let (_d, other) = empty_upstream();
    let elsewhere = Upstream::for_cache(fx, Compression::Xz);
    let dir = TempDir::new("secrets");
    std::fs::write(dir.join("token"), format!("{bearer}\n")).unwrap();
    std::fs::write(dir.join("netrc"), "machine 127.0.0.1 login someone password netrc-pw-5a5a\n").unwrap();
    let token_arg = format!("{}={}", up.url(), dir.join("token").display());
    let netrc_file = dir.join("netrc").to_string_lossy().into_owned();
    let ncps = Ncps::for_upstreams_with(
        &[other.url(), up.url()],
        &[&fx.up1_public_key],
        &[
            "--upstream-bearer-token-file", &token_arg,
            "--netrc-file", &netrc_file,
            "--cache-get-token", GET_TOKEN,
            "--cache-allow-put-verb", "--cache-write-token", WRITE_TOKEN,
            "--prometheus-enabled",
        ],
    );
    let key = http_request_with("GET", &format!("{}/pubkey", ncps.url()), &[("Authorization", &format!("Bearer {GET_TOKEN}"))])
        .unwrap()
        .text()
        .trim()
        .to_string();
    NixClient::Nix2_8
        .copy_from_with_netrc(&ncps.url(), &[&fx.top], &key, &netrc_for(GET_TOKEN))
        .expect("through the token-protected upstream");
    // Every request the first upstream got carried its token; the other one got the netrc's
    // Basic login for 127.0.0.1 (same host, its own origin), never the Bearer token.
    for (req, auth) in up.request_header("authorization") {
        assert_eq!(auth.as_deref(), Some(format!("Bearer {bearer}").as_str()), "{req}");
    }
    for (req, auth) in other.request_header("authorization") {
        assert!(auth.as_deref().is_none_or(|a| !a.contains(bearer)), "{req}: {auth:?}");
    }
    // A redirect to another origin gets neither followed nor the token.
    up.set_mode(Mode::RedirectTo(elsewhere.port()));
    let r = http_request_with("GET", &format!("{}/{}.narinfo", ncps.url(), store_hash(&fx.many[7])), &[("Authorization", &format!("Bearer {GET_TOKEN}"))]).unwrap();
    assert_ne!(r.status, 200);
    assert_eq!(elsewhere.total_hits(), 0, "{:?}", elsewhere.requests());
    // Failures too: a wrong read token, a PUT without the write token.
    let _ = http_request_with("GET", &format!("{}/", ncps.url()), &[("Authorization", "Bearer wrong")]);
    let _ = put(&ncps, "/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr.narinfo", b"x", None);

    let metrics = ncps.get("/metrics").text();
    let page = http_request_with("GET", &format!("{}/", ncps.url()), &[("Authorization", &format!("Bearer {GET_TOKEN}"))]).unwrap().text();
    let html = http_request_with(
        "GET",
        &format!("{}/", ncps.url()),
        &[("Authorization", &format!("Bearer {GET_TOKEN}")), ("Accept", "text/html")],
    )
    .unwrap()
    .text();
    let log = ncps.wait_for_log(0, "refused: the token presented is not accepted", std::time::Duration::from_secs(2));
    for secret in [bearer, "netrc-pw-5a5a", GET_TOKEN, WRITE_TOKEN, &b64("someone:netrc-pw-5a5a")] {
        for (what, text) in [("the log", &log), ("/metrics", &metrics), ("/ (JSON)", &page), ("/ (HTML)", &html)] {
            assert!(!text.contains(secret), "{secret} shows up in {what}");
        }
    }
}

// ---------------------------------------------------------------------------
// Start-up: combinations that would leave a hole stop ncps with one line
// ---------------------------------------------------------------------------

#[test]
fn open_writes_pointless_access_flags_and_unreadable_credentials_stop_start_up_with_one_line_naming_the_flag() {
    let d = TempDir::new("badcfg");
    let data = d.path().to_string_lossy().into_owned();
    std::fs::write(d.join("empty-token"), "\n").unwrap();
    let missing = d.join("no-such-file").to_string_lossy().into_owned();
    let empty_token = format!("http://127.0.0.1:9={}", d.join("empty-token").display());
    let missing_token = format!("http://127.0.0.1:9={missing}");
    let cases: &[(&[&str], &str)] = &[
        (&["--cache-allow-put-verb"], "--cache-allow-put-verb"),
        (&["--cache-allow-delete-verb"], "--cache-allow-delete-verb"),
        (&["--cache-allow-put-verb", "--cache-require-trusted-signature"], "--cache-trusted-upload-key"),
        (&["--cache-write-token", WRITE_TOKEN], "--cache-write-token"),
        (&["--cache-allow-put-verb", "--cache-write-token", "same", "--cache-get-token", "same"], "--cache-write-token"),
        (&["--netrc-file", &missing], "--netrc-file"),
        (&["--upstream-bearer-token-file", &missing_token], "--upstream-bearer-token-file"),
        (&["--upstream-bearer-token-file", &empty_token], "--upstream-bearer-token-file"),
        (&["--upstream-bearer-token-file", "http://127.0.0.1:10=/x"], "--upstream-bearer-token-file"),
    ];
    for (extra, flag) in cases {
        let mut args = vec!["serve", "--cache-hostname", HOSTNAME, "--cache-data-path", &data, "--upstream-cache",
            "http://127.0.0.1:9", "--server-addr", "{addr}"];
        args.extend_from_slice(extra);
        let (code, stderr) = run_ncps_expecting_failure(&args, &[]);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(code, Some(2), "{extra:?}: exit status; stderr:\n{stderr}");
        assert!(lines.len() == 1 && lines[0].contains(flag), "{extra:?}: one line naming {flag}:\n{stderr}");
        assert!(!stderr.contains(WRITE_TOKEN), "{extra:?}: the token is not printed: {stderr}");
    }
}
