//! Writes query results and reports for people (tables) and scripts (JSON, CSV, Arrow).

use std::io::Write;
use std::sync::Arc;

use anyhow::Context as _;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use clap::ValueEnum;
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// An aligned table for people.
    Table,
    /// JSON: an array of row objects (one JSON document).
    Json,
    /// CSV with a header row.
    Csv,
}

/// How `tally billing`, `tally overage` and `tally adoption` print their reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    /// Aligned tables for people.
    Table,
    /// JSON: one document.
    Json,
    /// CSV with a header row.
    Csv,
    /// An Arrow IPC stream of one table (for pyarrow, polars, DuckDB).
    Arrow,
}

/// Writes record batches in the given format.
pub fn write_batches(
    out: &mut dyn Write,
    batches: &[RecordBatch],
    format: Format,
) -> anyhow::Result<()> {
    match format {
        Format::Table => {
            let table = arrow::util::pretty::pretty_format_batches(batches)?;
            writeln!(out, "{table}")?;
        }
        Format::Json => {
            let mut writer = arrow::json::ArrayWriter::new(Vec::new());
            for b in batches {
                writer.write(b)?;
            }
            writer.finish()?;
            let mut bytes = writer.into_inner();
            if bytes.is_empty() {
                bytes.extend_from_slice(b"[]");
            }
            out.write_all(&bytes)?;
            writeln!(out)?;
        }
        Format::Csv => {
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(out);
            for b in batches {
                writer.write(b).context("writing CSV")?;
            }
        }
    }
    Ok(())
}

/// A CSV table (the billing lines) as an Arrow IPC stream: `events` as int64, every
/// other column as text (empty: null).
pub fn csv_to_arrow(csv: &[u8]) -> anyhow::Result<Vec<u8>> {
    let header = csv.split(|b| *b == b'\n').next().unwrap_or_default();
    let fields: Vec<Field> = String::from_utf8_lossy(header)
        .trim_end()
        .split(',')
        .map(|name| {
            let kind = if name == "events" {
                DataType::Int64
            } else {
                DataType::Utf8
            };
            Field::new(name, kind, true)
        })
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let reader = arrow::csv::ReaderBuilder::new(schema.clone())
        .with_header(true)
        .build(std::io::Cursor::new(csv))?;
    let mut out = Vec::new();
    let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut out, &schema)?;
    for batch in reader {
        writer.write(&batch?)?;
    }
    writer.finish()?;
    drop(writer);
    Ok(out)
}

/// A report of parts (the JSON object's arrays of rows) as one Arrow table: `section`
/// (the part's name), the object's scalars, then every part's columns in name order,
/// typed as inferred from the JSON; null where a part has no such column.
pub fn sections_to_arrow<R: Serialize>(report: &R) -> anyhow::Result<Vec<u8>> {
    let Value::Object(report) = serde_json::to_value(report)? else {
        anyhow::bail!("the report is not a JSON object");
    };
    let scalars: Vec<(&String, &Value)> = report.iter().filter(|(_, v)| !v.is_array()).collect();
    let mut heading = serde_json::Map::new();
    heading.insert("section".to_owned(), Value::from(""));
    for (name, value) in &scalars {
        heading.insert((*name).clone(), (*value).clone());
    }
    let mut rows = Vec::new();
    for (section, value) in &report {
        let Value::Array(items) = value else { continue };
        for item in items {
            let mut row = heading.clone();
            row.insert("section".to_owned(), Value::from(section.as_str()));
            if let Value::Object(fields) = item {
                row.extend(fields.clone());
            }
            rows.push(Value::Object(row));
        }
    }
    let heading = Value::Object(heading);
    let inferred = arrow::json::reader::infer_json_schema_from_iterator(
        rows.iter().chain([&heading]).map(Ok),
    )?;
    // `section` and the scalars first, then the rest in name order.
    let first: Vec<&str> = std::iter::once("section")
        .chain(scalars.iter().map(|(name, _)| name.as_str()))
        .collect();
    let mut fields: Vec<Arc<Field>> = first
        .iter()
        .filter_map(|name| inferred.field_with_name(name).ok())
        .map(|f| Arc::new(f.clone()))
        .collect();
    let mut rest: Vec<Arc<Field>> = inferred
        .fields()
        .iter()
        .filter(|f| !first.contains(&f.name().as_str()))
        .cloned()
        .collect();
    rest.sort_by(|a, b| a.name().cmp(b.name()));
    fields.extend(rest);
    let schema: SchemaRef = Arc::new(Schema::new(fields));

    let mut decoder = arrow::json::ReaderBuilder::new(schema.clone())
        .with_coerce_primitive(true)
        .build_decoder()?;
    let mut out = Vec::new();
    let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut out, &schema)?;
    for chunk in rows.chunks(8192) {
        decoder.serialize(chunk)?;
        if let Some(batch) = decoder.flush()? {
            writer.write(&batch)?;
        }
    }
    writer.finish()?;
    drop(writer);
    Ok(out)
}
