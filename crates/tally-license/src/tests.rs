//! Real keys and real signatures throughout; time is injected, never slept through.

use chrono::{Duration, TimeZone as _};
use serde_json::json;

use super::*;

fn at(y: i32, m: u32, d: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap()
}

/// A year's license from 2026-11-01, signed long before the system clock's present.
fn license() -> License {
    License {
        customer: "cust-00042".into(),
        plan: "pro".into(),
        features: BTreeMap::from([
            (
                "api-calls".into(),
                json!({"kind":"metered","limit":1000.0,"period":"month","enforcement":"hard"}),
            ),
            ("sso".into(), json!({"kind":"boolean","enabled":true})),
            (
                "retention".into(),
                json!({"kind":"static","value":{"days":90,"tier":"gold"}}),
            ),
        ]),
        seats: Some(25),
        regions: vec!["eu-west".into(), "us-east".into()],
        issued_at: at(2026, 10, 31),
        not_before: at(2026, 11, 1),
        expires_at: at(2027, 11, 1),
        key_id: String::new(),
    }
}

fn key_set(keys: &[&SigningKey]) -> KeySet {
    KeySet {
        keys: keys
            .iter()
            .map(|k| PublishedKey::active(&k.public(), at(2026, 1, 1)))
            .collect(),
    }
}

fn now() -> DateTime<Utc> {
    at(2027, 3, 15)
}

#[test]
fn a_signed_license_verifies_to_the_same_license_and_its_key_id() {
    let key = SigningKey::generate().unwrap();
    let token = key.sign(&license()).unwrap();
    assert!(token.starts_with("v4.public."), "{token}");
    assert!(key.key_id().starts_with("k4.pid."), "{}", key.key_id());

    let verified = verify(&token, &key_set(&[&key]), now()).unwrap();
    let expected = License {
        key_id: key.key_id().to_owned(),
        ..license()
    };
    assert_eq!(verified, expected);
}

#[test]
fn the_footer_names_the_key_as_json() {
    let key = SigningKey::generate().unwrap();
    let token = key.sign(&license()).unwrap();
    let untrusted = UntrustedToken::<Public, V4>::try_from(token.as_str()).unwrap();
    let footer = std::str::from_utf8(untrusted.untrusted_footer()).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(footer).unwrap(),
        json!({"kid": key.key_id()})
    );
}

#[test]
fn optional_fields_and_subsecond_times_survive_the_round_trip() {
    let key = SigningKey::generate().unwrap();
    let mut l = license();
    l.seats = None;
    l.regions.clear();
    l.features.clear();
    l.issued_at += Duration::nanoseconds(123_456_789);
    l.expires_at += Duration::milliseconds(250);
    let verified = verify(&key.sign(&l).unwrap(), &key_set(&[&key]), now()).unwrap();
    assert_eq!(verified.seats, None);
    assert!(verified.regions.is_empty() && verified.features.is_empty());
    assert_eq!(verified.issued_at, l.issued_at);
    assert_eq!(verified.expires_at, l.expires_at);
}

#[test]
fn a_tampered_payload_is_a_bad_signature() {
    let key = SigningKey::generate().unwrap();
    let token = key.sign(&license()).unwrap();
    // `v4.public.<payload>.<footer>`: change one character well inside the payload.
    let i = "v4.public.".len() + 20;
    let mut bytes = token.into_bytes();
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(bytes).unwrap();

    let err = verify(&tampered, &key_set(&[&key]), now()).unwrap_err();
    assert_eq!(
        err,
        VerifyError::BadSignature {
            kid: key.key_id().to_owned()
        }
    );
}

#[test]
fn the_signature_is_checked_before_the_claims() {
    // An altered expired token fails on its signature, not on its (unreadable) claims or dates.
    let key = SigningKey::generate().unwrap();
    let token = key.sign(&license()).unwrap();
    let i = "v4.public.".len() + 3;
    let mut bytes = token.into_bytes();
    bytes[i] = if bytes[i] == b'x' { b'y' } else { b'x' };
    let tampered = String::from_utf8(bytes).unwrap();
    assert!(matches!(
        verify(&tampered, &key_set(&[&key]), at(2030, 1, 1)),
        Err(VerifyError::BadSignature { .. })
    ));
}

#[test]
fn another_issuers_key_set_is_an_unknown_key() {
    let ours = SigningKey::generate().unwrap();
    let theirs = SigningKey::generate().unwrap();
    let token = theirs.sign(&license()).unwrap();
    let err = verify(&token, &key_set(&[&ours]), now()).unwrap_err();
    assert_eq!(
        err,
        VerifyError::UnknownKey {
            kid: theirs.key_id().to_owned()
        }
    );
    assert!(err.to_string().contains(theirs.key_id()), "{err}");
}

#[test]
fn the_validity_window_is_checked_against_the_injected_clock() {
    let key = SigningKey::generate().unwrap();
    let keys = key_set(&[&key]);
    let l = license();
    let token = key.sign(&l).unwrap();

    let expired = verify(&token, &keys, at(2028, 1, 1)).unwrap_err();
    assert_eq!(
        expired,
        VerifyError::Expired {
            expired_at: l.expires_at
        }
    );
    assert_eq!(
        expired.to_string(),
        "license expired at 2027-11-01T00:00:00Z"
    );
    // `exp` is excluded, `nbf` included.
    assert!(matches!(
        verify(&token, &keys, l.expires_at),
        Err(VerifyError::Expired { .. })
    ));
    assert!(verify(&token, &keys, l.expires_at - Duration::seconds(1)).is_ok());
    assert!(verify(&token, &keys, l.not_before).is_ok());

    let early = verify(&token, &keys, l.not_before - Duration::seconds(1)).unwrap_err();
    assert_eq!(
        early,
        VerifyError::NotYetValid {
            valid_from: l.not_before
        }
    );
    assert_eq!(
        early.to_string(),
        "license is not valid before 2026-11-01T00:00:00Z"
    );
}

#[test]
fn a_license_issued_in_the_future_is_not_yet_valid() {
    let key = SigningKey::generate().unwrap();
    let mut l = license();
    l.issued_at = at(2026, 12, 1);
    let token = key.sign(&l).unwrap();
    assert_eq!(
        verify(&token, &key_set(&[&key]), at(2026, 11, 15)).unwrap_err(),
        VerifyError::NotYetValid {
            valid_from: at(2026, 12, 1)
        }
    );
}

#[test]
fn garbage_is_malformed() {
    let key = SigningKey::generate().unwrap();
    let keys = key_set(&[&key]);
    let payload = serde_json::to_vec(&json!({"sub": "x"})).unwrap();
    let sign =
        |footer: Option<&[u8]>| PublicToken::sign(&key.secret, &payload, footer, None).unwrap();
    let without_footer = sign(None);
    let footer_without_kid = sign(Some(br#"{"key":"x"}"#));
    let footer_not_json = sign(Some(b"kid"));
    let kid_not_string = sign(Some(br#"{"kid":42}"#));
    let cases = [
        ("", "empty"),
        ("   \n", "empty"),
        ("hello", "not a PASETO token"),
        (
            "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2ln",
            "not a PASETO token",
        ),
        ("v4.public.", "not a v4.public PASETO token"),
        ("v4.public.!!!!.e30", "base64url"),
        ("v4.public.AAAA.e30", "not a v4.public PASETO token"),
        (without_footer.as_str(), "no footer"),
        (footer_without_kid.as_str(), "no key id"),
        (footer_not_json.as_str(), "not a JSON object"),
        (kid_not_string.as_str(), "not a string"),
    ];
    for (input, says) in cases {
        match verify(input, &keys, now()) {
            Err(VerifyError::Malformed(why)) => {
                assert!(why.contains(says), "{input:?}: {why:?} should say {says:?}")
            }
            other => panic!("{input:?}: expected Malformed, got {other:?}"),
        }
    }
    let huge = format!("v4.public.{}", "A".repeat(MAX_TOKEN_LEN));
    assert!(matches!(
        verify(&huge, &keys, now()),
        Err(VerifyError::Malformed(_))
    ));
}

#[test]
fn signed_claims_that_are_not_a_license_are_malformed() {
    // A genuine signature by a known key over JSON that lacks the license's fields.
    let key = SigningKey::generate().unwrap();
    let mut footer = Footer::new();
    footer.key_id(&key.id);
    let mut claims = Claims::new().unwrap();
    claims.subject("cust-1").unwrap();
    let token = public::sign(&key.secret, &claims, Some(&footer), None).unwrap();
    match verify(&token, &key_set(&[&key]), Utc::now()) {
        Err(VerifyError::Malformed(why)) => assert!(why.contains("plan"), "{why}"),
        other => panic!("expected Malformed, got {other:?}"),
    }
}

#[test]
fn local_and_v3_tokens_are_malformed() {
    use pasetors::keys::SymmetricKey;
    let key = SigningKey::generate().unwrap();
    let keys = key_set(&[&key]);
    let local_key = SymmetricKey::<V4>::generate().unwrap();
    let local =
        pasetors::version4::LocalToken::encrypt(&local_key, br#"{"sub":"x"}"#, None, None).unwrap();
    assert!(local.starts_with("v4.local."));
    assert_eq!(
        verify(&local, &keys, now()).unwrap_err(),
        VerifyError::Malformed("expected a v4.public token, found a v4.local token".into())
    );
    // A v3 token: the v4 token's body under a v3 header.
    let v4 = key.sign(&license()).unwrap();
    let v3 = v4.replacen("v4.public.", "v3.public.", 1);
    assert_eq!(
        verify(&v3, &keys, now()).unwrap_err(),
        VerifyError::Malformed("expected a v4.public token, found a v3.public token".into())
    );
}

#[test]
fn rotation_retired_and_active_keys_both_verify_until_the_retired_one_is_dropped() {
    let a = SigningKey::generate().unwrap();
    let b = SigningKey::generate().unwrap();
    let token_a = a.sign(&license()).unwrap();
    let token_b = b.sign(&license()).unwrap();

    let mut retired = PublishedKey::active(&a.public(), at(2026, 1, 1));
    retired.status = KeyStatus::Retired;
    retired.retired_at = Some(at(2026, 12, 1));
    let both = KeySet {
        keys: vec![retired, PublishedKey::active(&b.public(), at(2026, 12, 1))],
    };
    assert_eq!(verify(&token_a, &both, now()).unwrap().key_id, a.key_id());
    assert_eq!(verify(&token_b, &both, now()).unwrap().key_id, b.key_id());

    let only_b = key_set(&[&b]);
    assert_eq!(
        verify(&token_a, &only_b, now()).unwrap_err(),
        VerifyError::UnknownKey {
            kid: a.key_id().to_owned()
        }
    );
    assert!(verify(&token_b, &only_b, now()).is_ok());
}

#[test]
fn a_key_set_entry_whose_id_is_not_its_key_is_refused() {
    let a = SigningKey::generate().unwrap();
    let b = SigningKey::generate().unwrap();
    let token = a.sign(&license()).unwrap();
    // A hand-made set claiming A's id for B's key.
    let mut entry = PublishedKey::active(&b.public(), at(2026, 1, 1));
    entry.kid = a.key_id().to_owned();
    let keys = KeySet { keys: vec![entry] };
    assert!(matches!(
        verify(&token, &keys, now()),
        Err(VerifyError::InvalidKey { .. })
    ));
    let json = serde_json::to_string(&keys).unwrap();
    let err = KeySet::parse(&json).unwrap_err().to_string();
    assert!(err.contains("its public key has the id"), "{err}");
}

#[test]
fn key_set_parses_the_published_json() {
    let a = SigningKey::generate().unwrap();
    let b = SigningKey::generate().unwrap();
    let json = format!(
        r#"{{"keys":[
            {{"kid":"{}","public_key":"{}","created_at":"2026-01-01T00:00:00Z",
              "retired_at":"2026-12-01T00:00:00Z","status":"retired"}},
            {{"kid":"{}","public_key":"{}","created_at":"2026-12-01T00:00:00Z",
              "retired_at":null,"status":"active"}}
        ]}}"#,
        a.key_id(),
        a.public().paserk,
        b.key_id(),
        b.public().paserk
    );
    let set = KeySet::parse(&json).unwrap();
    assert_eq!(set.keys.len(), 2);
    assert_eq!(set.keys[0].status, KeyStatus::Retired);
    assert_eq!(set.keys[0].retired_at, Some(at(2026, 12, 1)));
    assert_eq!(
        set.keys[1],
        PublishedKey::active(&b.public(), at(2026, 12, 1))
    );
    // What the API serves parses back to itself.
    assert_eq!(
        KeySet::parse(&serde_json::to_string(&set).unwrap()).unwrap(),
        set
    );
    let value = serde_json::to_value(&set).unwrap();
    assert_eq!(value["keys"][1]["status"], "active");
}

#[test]
fn key_set_parses_a_bare_public_paserk() {
    let key = SigningKey::generate().unwrap();
    let text = format!("  {}\n", key.public().paserk);
    let set = KeySet::parse(&text).unwrap();
    assert_eq!(set.keys.len(), 1);
    assert_eq!(set.keys[0].kid, key.key_id());
    assert_eq!(set.keys[0].status, KeyStatus::Active);
    let token = key.sign(&license()).unwrap();
    assert!(verify(&token, &set, now()).is_ok());
}

#[test]
fn key_set_refuses_what_is_not_a_public_key_set() {
    let key = SigningKey::generate().unwrap();
    let dup = serde_json::to_string(&KeySet {
        keys: vec![
            PublishedKey::active(&key.public(), at(2026, 1, 1)),
            PublishedKey::active(&key.public(), at(2026, 2, 1)),
        ],
    })
    .unwrap();
    for (text, says) in [
        ("", "expected the key set JSON"),
        ("k4.public.short", "expected a k4.public PASERK"),
        (key.to_paserk().as_str(), "secret key"),
        (r#"{"keys":[{"kid":"x"}]}"#, "not the key set JSON"),
        (dup.as_str(), "listed twice"),
    ] {
        let err = KeySet::parse(text).unwrap_err().to_string();
        assert!(err.contains(says), "{text:?}: {err:?} should say {says:?}");
    }
}

#[test]
fn key_set_reads_both_file_forms() {
    let key = SigningKey::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bare = dir.path().join("key.paserk");
    std::fs::write(&bare, format!("{}\n", key.public().paserk)).unwrap();
    let json = dir.path().join("keys.json");
    std::fs::write(&json, serde_json::to_string(&key_set(&[&key])).unwrap()).unwrap();
    let token = key.sign(&license()).unwrap();
    for path in [&bare, &json] {
        let set = KeySet::from_file(path).unwrap();
        assert_eq!(verify(&token, &set, now()).unwrap().key_id, key.key_id());
    }
    let missing = dir.path().join("missing.json");
    assert!(matches!(KeySet::from_file(&missing), Err(Error::Io { .. })));
    std::fs::write(&bare, "nonsense").unwrap();
    let err = KeySet::from_file(&bare).unwrap_err();
    assert!(matches!(err, Error::KeyFile { .. }), "{err}");
    assert!(err.to_string().contains("key.paserk"), "{err}");
}

#[test]
fn a_signing_key_survives_its_paserk_round_trip() {
    let original = SigningKey::generate().unwrap();
    let stored = original.to_paserk();
    assert!(stored.starts_with("k4.secret."), "{stored}");
    let restored = SigningKey::from_paserk(&format!("{stored}\n")).unwrap();
    assert_eq!(restored.key_id(), original.key_id());
    assert_eq!(restored.public(), original.public());
    // The restored key signs tokens the original's published key verifies.
    let token = restored.sign(&license()).unwrap();
    let published = KeySet::parse(&original.public().paserk).unwrap();
    assert_eq!(
        verify(&token, &published, now()).unwrap().key_id,
        original.key_id()
    );
    assert_eq!(
        PublicKey::from_paserk(&original.public().paserk).unwrap(),
        original.public()
    );
    assert!(SigningKey::from_paserk(&original.public().paserk).is_err());
    assert!(format!("{original:?}").contains(original.key_id()));
    assert!(!format!("{original:?}").contains(&stored));
}

#[test]
fn a_license_that_would_never_be_valid_is_not_signed() {
    let key = SigningKey::generate().unwrap();
    let mut l = license();
    l.expires_at = l.not_before;
    assert!(matches!(key.sign(&l), Err(Error::License(_))));
    let mut l = license();
    l.customer.clear();
    assert!(matches!(key.sign(&l), Err(Error::License(_))));
}
