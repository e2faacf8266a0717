//! The contract every [`Index`] is held to (see the module documentation of
//! [`crate::index`]). Each implementation runs [`every_rule`] on a fresh, empty index.

use super::*;

fn hash(c: char) -> StorePathHash {
    StorePathHash::parse(&c.to_string().repeat(32)).expect("valid hash")
}

fn record(c: char, stored: bool) -> NarRecord {
    NarRecord {
        name: NarName::parse(&format!("{}.nar.xz", c.to_string().repeat(52))).expect("valid name"),
        file_hash: Hash::of(b"nar"),
        file_size: 3,
        upstream_url: "http://up/nar/x".into(),
        stored,
    }
}

/// A NAR record for tests outside the contract.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub fn some_nar() -> NarRecord {
    record('9', false)
}

/// Runs every rule; each leaves the index empty again.
pub fn every_rule(index: &dyn Index) {
    a_narinfo_records_its_nar_and_rerecording_keeps_the_stored_flag(index);
    a_narinfo_never_changes_what_a_nar_name_another_narinfo_uses_stands_for(index);
    a_nar_shared_by_two_narinfos_goes_with_the_last_one(index);
    totals_follow_every_write(index);
    a_batch_of_deletes_takes_exactly_its_rows_off_the_totals(index);
    the_lru_order_counts_a_nars_use_for_its_narinfos(index);
    pending_narinfos_are_spared_until_their_grace_ends(index);
    shard_listings_return_exactly_their_keys(index);
    unreferenced_nars_are_listed(index);
    a_zstd_copy_counts_while_its_nar_is_stored_and_goes_with_it(index);
    a_lease_has_one_holder_until_it_expires_or_is_released(index);
}

fn empty(index: &dyn Index) {
    assert_eq!(index.totals().unwrap(), Totals::default(), "the rule left rows behind");
    index.check_integrity().expect("the totals match the rows");
}

fn a_narinfo_records_its_nar_and_rerecording_keeps_the_stored_flag(index: &dyn Index) {
    let h = hash('a');
    let nar = record('1', false);
    assert_eq!(index.put_narinfo(&h, "/nix/store/x-y", &nar, 100).unwrap(), Recorded::Done { replaced_size: 0 });
    assert_eq!(index.nar(&nar.name).unwrap(), Some(nar.clone()));
    assert_eq!(index.narinfo_nar(&h).unwrap(), Some(nar.name.clone()));
    assert!(index.set_nar_stored(&nar.name, true).unwrap());
    assert_eq!(index.totals().unwrap().bytes(), 103);
    let again = index.put_narinfo(&h, "/nix/store/x-y", &nar, 90).unwrap();
    assert_eq!(again, Recorded::Done { replaced_size: 100 });
    assert!(index.nar(&nar.name).unwrap().unwrap().stored);
    let removed = index.remove_narinfos(&[h, hash('z')]).unwrap();
    assert_eq!(removed.len(), 1, "unknown hashes are skipped");
    assert_eq!(removed[0].nar, Some((nar.name.clone(), Some(3))));
    empty(index);
}

fn a_narinfo_never_changes_what_a_nar_name_another_narinfo_uses_stands_for(index: &dyn Index) {
    let (small, other) = (hash('a'), hash('b'));
    let nar = record('1', false);
    index.put_narinfo(&small, "/nix/store/a-small", &nar, 10).unwrap();
    assert!(index.set_nar_stored(&nar.name, true).unwrap());
    for (hash, size) in [(Hash::of(b"other"), nar.file_size), (nar.file_hash, nar.file_size + 1)] {
        let claim = NarRecord { file_hash: hash, file_size: size, upstream_url: "http://evil/x".into(), ..nar.clone() };
        assert_eq!(index.put_narinfo(&other, "/nix/store/b-other", &claim, 10).unwrap(), Recorded::NameTaken);
        assert!(!index.put_nar(&claim).unwrap(), "an upload cannot change it either");
        assert_eq!(index.nar(&nar.name).unwrap(), Some(NarRecord { stored: true, ..nar.clone() }), "untouched");
        assert_eq!(index.narinfo_nar(&other).unwrap(), None, "nothing recorded for the other narinfo");
    }
    index.remove_narinfos(&[small]).unwrap();
    empty(index);
}

fn a_nar_shared_by_two_narinfos_goes_with_the_last_one(index: &dyn Index) {
    let (a, b) = (hash('a'), hash('b'));
    let nar = record('1', false);
    index.put_narinfo(&a, "/nix/store/a-x", &nar, 10).unwrap();
    index.put_narinfo(&b, "/nix/store/b-x", &nar, 10).unwrap();
    index.set_nar_stored(&nar.name, true).unwrap();
    assert_eq!(index.totals().unwrap().bytes(), 23, "the shared NAR counts once");
    let r = index.remove_narinfos(&[a]).unwrap();
    assert_eq!(r[0].nar, None);
    let r = index.remove_narinfos(&[b]).unwrap();
    assert_eq!(r[0].nar, Some((nar.name.clone(), Some(3))));
    assert!(!index.set_nar_stored(&nar.name, true).unwrap(), "a removed NAR cannot be marked stored");
    index.put_narinfo(&a, "/nix/store/a-x", &nar, 10).unwrap();
    index.put_narinfo(&b, "/nix/store/b-x", &nar, 10).unwrap();
    let r = index.remove_nar(&nar.name).unwrap().unwrap();
    assert_eq!(r.narinfos.len(), 2, "removing a NAR takes its narinfos");
    assert_eq!(index.remove_nar(&nar.name).unwrap(), None);
    empty(index);
}

fn totals_follow_every_write(index: &dyn Index) {
    let nar = record('2', false);
    index.put_nar(&nar).unwrap();
    assert_eq!(index.totals().unwrap(), Totals::default(), "a NAR not stored counts nothing");
    index.set_nar_stored(&nar.name, true).unwrap();
    assert_eq!(index.totals().unwrap(), Totals { narinfos: 0, narinfo_bytes: 0, nars: 1, nar_bytes: 3 });
    index.put_narinfo(&hash('c'), "/nix/store/c-x", &nar, 40).unwrap();
    index.put_narinfo(&hash('c'), "/nix/store/c-x", &nar, 50).unwrap();
    assert_eq!(index.totals().unwrap(), Totals { narinfos: 1, narinfo_bytes: 50, nars: 1, nar_bytes: 3 });
    index.delete_narinfo_row(&hash('c')).unwrap();
    index.set_nar_stored(&nar.name, false).unwrap();
    assert_eq!(index.totals().unwrap(), Totals::default());
    index.remove_nar(&nar.name).unwrap();
    empty(index);
}

fn a_batch_of_deletes_takes_exactly_its_rows_off_the_totals(index: &dyn Index) {
    // a and b share a stored NAR (with a zstd copy), c has a stored NAR of its own, d one
    // not stored, g is kept and shares nothing with the batch.
    let shared = record('1', false);
    let (own, unstored, kept) = (record('2', false), record('3', false), record('4', false));
    for (h, nar, size) in [('a', &shared, 10), ('b', &shared, 20), ('c', &own, 30), ('d', &unstored, 40), ('g', &kept, 50)] {
        index.put_narinfo(&hash(h), "/nix/store/x", nar, size).unwrap();
    }
    for nar in [&shared, &own, &kept] {
        index.set_nar_stored(&nar.name, true).unwrap();
    }
    index.set_nar_zstd(&shared.name, 2).unwrap();
    assert_eq!(index.totals().unwrap(), Totals { narinfos: 5, narinfo_bytes: 150, nars: 3, nar_bytes: 11 });
    let removed = index.remove_narinfos(&[hash('d'), hash('b'), hash('z'), hash('a'), hash('c')]).unwrap();
    assert_eq!(removed.len(), 4, "the unknown hash is skipped");
    let mut nars: Vec<_> = removed.iter().filter_map(|r| r.nar.clone()).collect();
    nars.sort();
    let mut want = vec![(shared.name.clone(), Some(5)), (own.name.clone(), Some(3)), (unstored.name.clone(), None)];
    want.sort();
    assert_eq!(nars, want, "each NAR once, a stored one with its bytes and its copy's");
    assert_eq!(index.totals().unwrap(), Totals { narinfos: 1, narinfo_bytes: 50, nars: 1, nar_bytes: 3 });
    index.check_integrity().expect("the totals match the rows");
    index.put_narinfo(&hash('h'), "/nix/store/x", &kept, 60).unwrap();
    let r = index.remove_nar(&kept.name).unwrap().unwrap();
    assert_eq!(r.narinfos.len(), 2);
    assert_eq!(r.nar, Some((kept.name.clone(), Some(3))));
    empty(index);
}

fn the_lru_order_counts_a_nars_use_for_its_narinfos(index: &dyn Index) {
    let (a, b, c) = (hash('a'), hash('b'), hash('c'));
    for (h, n) in [(a, '1'), (b, '2'), (c, '3')] {
        let nar = record(n, false);
        index.put_narinfo(&h, "/nix/store/x", &nar, 1).unwrap();
        index.set_nar_stored(&nar.name, true).unwrap();
    }
    let now = now();
    index.touch(&[(a, now + 10), (c, now + 20)], &[(record('2', true).name, now + 30)]).unwrap();
    let lru = index.least_recently_used(10, 0).unwrap();
    assert_eq!(lru, vec![(a, 4), (c, 4), (b, 4)], "each with its size and its NAR's");
    assert_eq!(index.least_recently_used(1, 0).unwrap().len(), 1, "the limit is kept");
    let removed = index.remove_narinfos(&[a, b, c]).unwrap();
    assert_eq!(removed.len(), 3);
    empty(index);
}

fn pending_narinfos_are_spared_until_their_grace_ends(index: &dyn Index) {
    let h = hash('d');
    index.put_narinfo(&h, "/nix/store/d", &record('4', false), 1).unwrap();
    assert!(index.least_recently_used(10, 0).unwrap().is_empty(), "its NAR was never fetched");
    assert_eq!(index.least_recently_used(10, now() + 1).unwrap(), vec![(h, 1)]);
    index.remove_narinfos(&[h]).unwrap();
    empty(index);
}

fn shard_listings_return_exactly_their_keys(index: &dyn Index) {
    let (a, b) = (hash('a'), hash('b'));
    index.put_narinfo(&a, "/nix/store/a", &record('1', false), 1).unwrap();
    index.put_narinfo(&b, "/nix/store/b", &record('b', false), 1).unwrap();
    let in_aa = index.narinfos_in_shard("aa").unwrap();
    assert_eq!(in_aa.len(), 1);
    assert_eq!((in_aa[0].hash, in_aa[0].nar.clone()), (a, Some(record('1', false).name)));
    assert!(index.narinfos_in_shard("ab").unwrap().is_empty());
    assert_eq!(index.nars_in_shard("11").unwrap().len(), 1);
    assert_eq!(index.nars_in_shard("bb").unwrap()[0].record, record('b', false));
    assert!(index.nars_in_shard("1a").unwrap().is_empty());
    index.remove_narinfos(&[a, b]).unwrap();
    empty(index);
}

fn unreferenced_nars_are_listed(index: &dyn Index) {
    let nar = record('5', false);
    index.put_nar(&nar).unwrap();
    index.set_nar_stored(&nar.name, true).unwrap();
    assert_eq!(index.unreferenced_nars(10).unwrap(), vec![(nar.name.clone(), 3)]);
    index.put_narinfo(&hash('f'), "/nix/store/e", &nar, 1).unwrap();
    assert!(index.unreferenced_nars(10).unwrap().is_empty());
    index.remove_narinfos(&[hash('f')]).unwrap();
    empty(index);
}

fn a_zstd_copy_counts_while_its_nar_is_stored_and_goes_with_it(index: &dyn Index) {
    let nar = record('3', false);
    index.put_nar(&nar).unwrap();
    assert!(!index.set_nar_zstd(&nar.name, 2).unwrap(), "no copy of a NAR not stored");
    index.set_nar_stored(&nar.name, true).unwrap();
    assert!(index.set_nar_zstd(&nar.name, 2).unwrap());
    assert_eq!(index.totals().unwrap(), Totals { narinfos: 0, narinfo_bytes: 0, nars: 1, nar_bytes: 5 }, "3 + its copy's 2");
    index.set_nar_stored(&nar.name, false).unwrap();
    assert_eq!(index.totals().unwrap(), Totals::default(), "a NAR not stored has no copy");
    index.set_nar_stored(&nar.name, true).unwrap();
    index.set_nar_zstd(&nar.name, 2).unwrap();
    let removed = index.remove_nar(&nar.name).unwrap().expect("removed");
    assert_eq!(removed.nar, Some((nar.name.clone(), Some(5))), "what removal frees includes the copy");
    empty(index);

    index.put_nar(&nar).unwrap();
    index.set_nar_stored(&nar.name, true).unwrap();
    index.set_nar_zstd(&nar.name, 2).unwrap();
    assert_eq!(index.forget_nar_zstd().unwrap(), 1, "after an unclean stop every copy is forgotten");
    assert_eq!(index.totals().unwrap().nar_bytes, 3, "and no longer counted");
    assert_eq!(index.forget_nar_zstd().unwrap(), 0);
    index.remove_nar(&nar.name).unwrap();
    empty(index);
}

fn a_lease_has_one_holder_until_it_expires_or_is_released(index: &dyn Index) {
    let (key, t) = ("nar/1111.nar.xz", 1_000);
    assert!(index.take_lease(key, "replica-a", t, 30).unwrap(), "a free lease is taken");
    assert!(!index.take_lease(key, "replica-b", t + 10, 30).unwrap(), "not while another holds it");
    assert_eq!(index.lease_holder(key, t + 10).unwrap().as_deref(), Some("replica-a"), "who holds it is known");
    assert_eq!(index.lease_holder(key, t + 30).unwrap(), None, "an expired lease is no one's");
    assert_eq!(index.lease_holder("nobody", t).unwrap(), None);
    assert!(index.take_lease("short", "replica-c", t, 5).unwrap());
    assert_eq!(index.purge_expired_leases(t + 4).unwrap(), 0, "a live lease stays");
    assert_eq!(index.purge_expired_leases(t + 5).unwrap(), 1, "an expired one goes");
    assert_eq!(index.purge_expired_leases(t + 5).unwrap(), 0);
    assert!(index.take_lease(key, "replica-a", t + 20, 30).unwrap(), "its holder renews it");
    assert!(!index.take_lease(key, "replica-b", t + 49, 30).unwrap(), "the renewal counts from t + 20");
    assert!(index.take_lease(key, "replica-b", t + 50, 30).unwrap(), "an expired lease is taken over");
    assert!(!index.release_lease(key, "replica-a").unwrap(), "a holder that lost it cannot release it");
    assert!(index.take_lease("other", "replica-a", t, 30).unwrap(), "leases are per key");
    assert!(index.release_lease(key, "replica-b").unwrap());
    assert!(index.take_lease(key, "replica-a", t + 51, 30).unwrap(), "a released lease is free at once");
    assert!(index.release_lease(key, "replica-a").unwrap() && index.release_lease("other", "replica-a").unwrap());
    empty(index);
}
