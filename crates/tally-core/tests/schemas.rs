//! The files in `schemas/` are the contract for people outside Rust; these tests keep the
//! Rust decoder and the Arrow schema equal to them.

use std::fs;
use std::path::{Path, PathBuf};

use tally_core::schema::{describe, lake_schema};
use tally_core::{DecodeLimits, Frame, Reason};

fn schemas_dir() -> PathBuf {
    // At run time, not compile time: a build cache shared between checkouts must not
    // point the tests at another checkout's files.
    PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("run under cargo"))
        .join("../../schemas")
}

fn json_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_valid_example_decodes() {
    let files = json_files(&schemas_dir().join("examples/valid"));
    assert!(files.len() >= 5, "too few valid examples: {files:?}");
    for path in files {
        let bytes = fs::read(&path).unwrap();
        let frame = Frame::decode(&bytes, &DecodeLimits::default())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!frame.events.is_empty());
        for (i, event) in frame.events.into_iter().enumerate() {
            let event = event.unwrap_or_else(|e| panic!("{} #{i}: {e:?}", path.display()));
            assert!(!event.id.is_empty() && !event.feature.is_empty());
            assert!(event.quantity.is_finite() && event.quantity >= 0.0);
        }
    }
}

/// File names state the expected outcome: `<reason>.json` or `<reason>__<field>.json`.
#[test]
fn every_invalid_example_is_refused_for_its_reason() {
    let files = json_files(&schemas_dir().join("examples/invalid"));
    let mut reasons_seen = std::collections::BTreeSet::new();
    for path in &files {
        let stem = path.file_stem().unwrap().to_str().unwrap();
        let (code, field) = match stem.split_once("__") {
            Some((code, field)) => (code, Some(field)),
            None => (stem, None),
        };
        let expected = Reason::from_code(code).unwrap_or_else(|| panic!("unknown reason {code}"));
        let bytes = fs::read(path).unwrap();
        let invalid = match Frame::decode(&bytes, &DecodeLimits::default()) {
            Err(e) => e,
            Ok(frame) => {
                assert_eq!(frame.events.len(), 1, "{stem}");
                frame.events.into_iter().next().unwrap().unwrap_err()
            }
        };
        assert_eq!(invalid.reason, expected, "{stem}: {}", invalid.message);
        assert_eq!(
            invalid.field.as_deref(),
            field,
            "{stem}: {}",
            invalid.message
        );
        assert!(!invalid.message.is_empty());
        reasons_seen.insert(code.to_owned());
    }
    // Every event-level reason has an example; message-level ones, and those judged when
    // the event is received (its subject, its time, what the meters bound to features read
    // of it), are tested in the crates and in tests/it/bad_input.rs.
    for reason in Reason::ALL {
        let message_level = matches!(
            reason,
            Reason::TooLarge
                | Reason::TooManyEvents
                | Reason::EmptyBatch
                | Reason::SubjectMismatch
                | Reason::NotArrow
                | Reason::FutureTime
                | Reason::UnreadableValue
        );
        assert!(
            message_level || reasons_seen.contains(reason.as_str()),
            "no invalid example for {reason}"
        );
    }
}

#[test]
fn lake_schema_matches_the_schema_file() {
    let text = fs::read_to_string(schemas_dir().join("lake.schema.json")).unwrap();
    let file: serde_json::Value = serde_json::from_str(&text).unwrap();
    let from_file: Vec<(String, String, bool)> = file["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["type"].as_str().unwrap().to_owned(),
                c["nullable"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(describe(&lake_schema()), from_file);
}

/// The JSON Schema agrees with the decoder: every valid example validates, and every
/// invalid example that is JSON at all is refused by the schema too.
#[test]
fn the_json_schema_agrees_with_the_decoder() {
    let schema: serde_json::Value =
        serde_json::from_slice(&fs::read(schemas_dir().join("event.schema.json")).unwrap())
            .unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    for path in json_files(&schemas_dir().join("examples/valid")) {
        let value: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        let events = match value {
            serde_json::Value::Array(items) => items,
            one => vec![one],
        };
        for event in events {
            let errors: Vec<String> = validator
                .iter_errors(&event)
                .map(|e| e.to_string())
                .collect();
            assert!(errors.is_empty(), "{}: {errors:?}", path.display());
        }
    }
    let mut checked = 0;
    for path in json_files(&schemas_dir().join("examples/invalid")) {
        // Not JSON, or a number no JSON library holds (1e999): only the decoder can judge.
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&fs::read(&path).unwrap())
        else {
            continue;
        };
        assert!(
            !validator.is_valid(&value),
            "the schema accepts {}",
            path.display()
        );
        checked += 1;
    }
    assert!(
        checked >= 15,
        "only {checked} invalid examples checked against the schema"
    );
}
