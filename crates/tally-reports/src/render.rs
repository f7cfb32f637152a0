//! The one writer of every report: JSON, CSV, an Arrow IPC stream or aligned tables, from
//! the report's typed rows.
//!
//! A report ([`Report`]) is a serializable value (its JSON is that value, as serde writes
//! it) and a list of [`Section`]s: tables whose columns are declared with their kind
//! ([`Column`]), so that the CSV header and the Arrow schema are the same whatever the
//! rows, none included.
//!
//! - **JSON**: the report's own serialization, one document and a newline.
//! - **CSV**: each section with a header row. A report of several sections writes them
//!   one after the other, separated by a blank line, each row led by a `section` column
//!   naming its part.
//! - **Arrow**: one table. A report of one section is that section; a report of several
//!   is every section's rows in one table: `section`, the report's heading fields (its
//!   period or range, on every row), then every section's columns in name order, null
//!   where a part has no such column.
//! - **Table**: for people, [`Report::for_people`] (the sections unless the report lays
//!   itself out otherwise), each with its title; numbers aligned to the right.
//!
//! Quantities are `Float` (Arrow Float64); money is `Decimal`, written as exact decimal
//! text everywhere (Arrow Utf8), never rounded through a float.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Date32Builder, Float64Builder, Int64Builder, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use serde::Serialize;

/// What a report is written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Aligned tables for people.
    Table,
    /// One JSON document.
    Json,
    /// CSV with a header row.
    Csv,
    /// An Arrow IPC stream of one table (for pyarrow, polars, DuckDB).
    Arrow,
}

/// What a column holds, which decides its Arrow type and how its cells are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    /// An exact decimal (money, rated quantities), kept as text.
    Decimal,
    Int,
    /// A quantity, written as the shortest text that reads back the same.
    Float,
    /// A ratio, written with this many decimals in CSV and tables.
    Fixed(usize),
    Date,
    /// An instant, RFC 3339 in seconds, UTC.
    Time,
}

impl Kind {
    fn data_type(self) -> DataType {
        match self {
            Kind::Text | Kind::Decimal => DataType::Utf8,
            Kind::Int => DataType::Int64,
            Kind::Float | Kind::Fixed(_) => DataType::Float64,
            Kind::Date => DataType::Date32,
            Kind::Time => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        }
    }

    fn numeric(self) -> bool {
        !matches!(self, Kind::Text | Kind::Date | Kind::Time)
    }
}

/// A column of a section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub name: &'static str,
    pub kind: Kind,
}

/// A column named `name` holding `kind`.
pub const fn col(name: &'static str, kind: Kind) -> Column {
    Column { name, kind }
}

/// One value of a row.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Text(String),
    Int(i64),
    Float(f64),
    Date(NaiveDate),
    Time(DateTime<Utc>),
}

impl From<&str> for Cell {
    fn from(v: &str) -> Self {
        Cell::Text(v.to_owned())
    }
}

impl From<String> for Cell {
    fn from(v: String) -> Self {
        Cell::Text(v)
    }
}

impl From<u64> for Cell {
    fn from(v: u64) -> Self {
        Cell::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

impl From<f64> for Cell {
    fn from(v: f64) -> Self {
        Cell::Float(v)
    }
}

impl From<NaiveDate> for Cell {
    fn from(v: NaiveDate) -> Self {
        Cell::Date(v)
    }
}

impl From<DateTime<Utc>> for Cell {
    fn from(v: DateTime<Utc>) -> Self {
        Cell::Time(v)
    }
}

impl<T: Into<Cell>> From<Option<T>> for Cell {
    fn from(v: Option<T>) -> Self {
        v.map_or(Cell::Null, Into::into)
    }
}

impl Cell {
    /// The cell as CSV and tables write it: empty for null.
    fn text(&self, kind: Kind) -> String {
        match (self, kind) {
            (Cell::Null, _) => String::new(),
            (Cell::Text(v), _) => v.clone(),
            (Cell::Int(v), _) => v.to_string(),
            (Cell::Float(v), Kind::Fixed(decimals)) => format!("{v:.decimals$}"),
            (Cell::Float(v), _) => v.to_string(),
            (Cell::Date(v), _) => v.to_string(),
            (Cell::Time(v), _) => v.to_rfc3339_opts(SecondsFormat::Secs, true),
        }
    }
}

/// One part of a report: a table with a title for people.
#[derive(Debug, Clone, PartialEq)]
pub struct Section {
    /// The part's name: the `section` column of a report of several parts.
    pub name: &'static str,
    pub title: String,
    pub columns: &'static [Column],
    pub rows: Vec<Vec<Cell>>,
}

/// A report the renderer writes.
pub trait Report: Serialize {
    /// The report's scalar fields (its period or range), leading every row of its Arrow
    /// table when it has several sections.
    fn heading(&self) -> Vec<(Column, Cell)> {
        Vec::new()
    }

    /// The report's parts, with their declared columns.
    fn sections(&self) -> Vec<Section>;

    /// What a person reads in a terminal: the sections unless the report says otherwise.
    fn for_people(&self) -> Vec<Section> {
        self.sections()
    }
}

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("writing the report: {0}")]
    Io(#[from] std::io::Error),
    #[error("writing the report as JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("writing the report as Arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// A row does not fit its section's columns: a bug in the report.
    #[error("the report's {section} part: {message}")]
    Shape {
        section: &'static str,
        message: String,
    },
}

/// Writes `report` as `format`.
pub fn render(
    report: &impl Report,
    format: Format,
    out: &mut dyn Write,
) -> Result<(), RenderError> {
    match format {
        Format::Json => {
            serde_json::to_writer(&mut *out, report)?;
            writeln!(out)?;
        }
        Format::Csv => write_csv(out, &report.sections())?,
        Format::Table => write_tables(out, &report.for_people())?,
        Format::Arrow => write_arrow(out, &report.heading(), &report.sections())?,
    }
    Ok(())
}

/// `report` as `format`, in memory.
pub fn to_bytes(report: &impl Report, format: Format) -> Result<Vec<u8>, RenderError> {
    let mut out = Vec::new();
    render(report, format, &mut out)?;
    Ok(out)
}

/// The Arrow schema of `report`'s table: the same for any rows.
pub fn arrow_schema(report: &impl Report) -> Result<SchemaRef, RenderError> {
    Ok(table_columns(&report.heading(), &report.sections())?.0)
}

/// A CSV field, quoted when it must be (RFC 4180).
pub fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\"")).into()
    } else {
        s.into()
    }
}

fn write_csv(out: &mut dyn Write, sections: &[Section]) -> std::io::Result<()> {
    let several = sections.len() > 1;
    for (i, s) in sections.iter().enumerate() {
        if i > 0 {
            writeln!(out)?;
        }
        let lead = several.then_some("section");
        let header: Vec<_> = lead
            .into_iter()
            .chain(s.columns.iter().map(|c| c.name))
            .map(csv_field)
            .collect();
        writeln!(out, "{}", header.join(","))?;
        for row in &s.rows {
            let lead = several.then(|| s.name.to_owned());
            let cells: Vec<String> = lead
                .into_iter()
                .chain(row.iter().zip(s.columns).map(|(c, col)| c.text(col.kind)))
                .map(|t| csv_field(&t).into_owned())
                .collect();
            writeln!(out, "{}", cells.join(","))?;
        }
    }
    Ok(())
}

/// Aligned tables; numbers to the right.
fn write_tables(out: &mut dyn Write, sections: &[Section]) -> std::io::Result<()> {
    for (i, s) in sections.iter().enumerate() {
        if i > 0 {
            writeln!(out)?;
        }
        writeln!(out, "{}", s.title)?;
        if s.rows.is_empty() {
            writeln!(out, "  (none)")?;
            continue;
        }
        let cells: Vec<Vec<String>> = s
            .rows
            .iter()
            .map(|r| {
                r.iter()
                    .zip(s.columns)
                    .map(|(c, col)| c.text(col.kind))
                    .collect()
            })
            .collect();
        let widths: Vec<usize> = (0..s.columns.len())
            .map(|c| {
                cells
                    .iter()
                    .map(|r| r.get(c).map_or(0, |v| v.chars().count()))
                    .chain([s.columns[c].name.chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |values: &mut dyn Iterator<Item = &str>| -> String {
            let parts: Vec<String> = values
                .zip(s.columns)
                .zip(&widths)
                .map(|((v, col), &w)| {
                    if col.kind.numeric() {
                        format!("{v:>w$}")
                    } else {
                        format!("{v:<w$}")
                    }
                })
                .collect();
            format!("  {}", parts.join("  ").trim_end())
        };
        writeln!(out, "{}", line(&mut s.columns.iter().map(|c| c.name)))?;
        for row in &cells {
            writeln!(out, "{}", line(&mut row.iter().map(String::as_str)))?;
        }
    }
    Ok(())
}

/// The table's columns: one section's own, or `section`, the heading and every
/// section's columns in name order.
fn table_columns(
    heading: &[(Column, Cell)],
    sections: &[Section],
) -> Result<(SchemaRef, Vec<Column>), RenderError> {
    let columns: Vec<Column> = match sections {
        [one] => one.columns.to_vec(),
        _ => {
            let mut rest: BTreeMap<&'static str, Column> = BTreeMap::new();
            for s in sections {
                for c in s.columns {
                    match rest.insert(c.name, *c) {
                        Some(before) if before.kind.data_type() != c.kind.data_type() => {
                            return Err(RenderError::Shape {
                                section: s.name,
                                message: format!("column {} has two types", c.name),
                            });
                        }
                        _ => {}
                    }
                }
            }
            std::iter::once(col("section", Kind::Text))
                .chain(heading.iter().map(|(c, _)| *c))
                .chain(rest.into_values().filter(|c| {
                    c.name != "section" && heading.iter().all(|(h, _)| h.name != c.name)
                }))
                .collect()
        }
    };
    let fields: Vec<Field> = columns
        .iter()
        .map(|c| Field::new(c.name, c.kind.data_type(), true))
        .collect();
    Ok((Arc::new(Schema::new(fields)), columns))
}

fn write_arrow(
    out: &mut dyn Write,
    heading: &[(Column, Cell)],
    sections: &[Section],
) -> Result<(), RenderError> {
    let (schema, columns) = table_columns(heading, sections)?;
    let several = sections.len() > 1;
    let mut writer = arrow::ipc::writer::StreamWriter::try_new(out, &schema)?;
    for s in sections {
        if s.rows.is_empty() {
            continue;
        }
        let arrays = columns
            .iter()
            .map(|c| {
                let at = s.columns.iter().position(|own| own.name == c.name);
                let heading = heading.iter().find(|(h, _)| h.name == c.name);
                let cell = |row: &[Cell]| -> Cell {
                    match (at, heading) {
                        _ if several && c.name == "section" => Cell::from(s.name),
                        (Some(i), _) => row.get(i).cloned().unwrap_or(Cell::Null),
                        (None, Some((_, value))) => value.clone(),
                        (None, None) => Cell::Null,
                    }
                };
                array(s.name, *c, s.rows.iter().map(|r| cell(r)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        writer.write(&RecordBatch::try_new(schema.clone(), arrays)?)?;
    }
    writer.finish()?;
    Ok(())
}

/// A column's cells as an Arrow array of its kind.
fn array(
    section: &'static str,
    column: Column,
    cells: impl Iterator<Item = Cell>,
) -> Result<ArrayRef, RenderError> {
    let wrong = |cell: &Cell| RenderError::Shape {
        section,
        message: format!("column {} holds {cell:?}", column.name),
    };
    Ok(match column.kind {
        Kind::Text | Kind::Decimal => {
            let mut b = StringBuilder::new();
            for cell in cells {
                match cell {
                    Cell::Null => b.append_null(),
                    Cell::Text(v) => b.append_value(v),
                    other => return Err(wrong(&other)),
                }
            }
            Arc::new(b.finish())
        }
        Kind::Int => {
            let mut b = Int64Builder::new();
            for cell in cells {
                match cell {
                    Cell::Null => b.append_null(),
                    Cell::Int(v) => b.append_value(v),
                    other => return Err(wrong(&other)),
                }
            }
            Arc::new(b.finish())
        }
        Kind::Float | Kind::Fixed(_) => {
            let mut b = Float64Builder::new();
            for cell in cells {
                match cell {
                    Cell::Null => b.append_null(),
                    Cell::Float(v) => b.append_value(v),
                    other => return Err(wrong(&other)),
                }
            }
            Arc::new(b.finish())
        }
        Kind::Date => {
            let mut b = Date32Builder::new();
            for cell in cells {
                match cell {
                    Cell::Null => b.append_null(),
                    Cell::Date(v) => b.append_value(
                        i32::try_from((v - NaiveDate::default()).num_days()).unwrap_or(i32::MAX),
                    ),
                    other => return Err(wrong(&other)),
                }
            }
            Arc::new(b.finish())
        }
        Kind::Time => {
            let mut b = TimestampMicrosecondBuilder::new().with_timezone("UTC");
            for cell in cells {
                match cell {
                    Cell::Null => b.append_null(),
                    Cell::Time(v) => b.append_value(v.timestamp_micros()),
                    other => return Err(wrong(&other)),
                }
            }
            Arc::new(b.finish())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Two {
        period: &'static str,
        a: Vec<u64>,
        b: Vec<&'static str>,
    }

    const A: &[Column] = &[col("n", Kind::Int), col("ratio", Kind::Fixed(2))];
    const B: &[Column] = &[col("name", Kind::Text), col("n", Kind::Int)];

    impl Report for Two {
        fn heading(&self) -> Vec<(Column, Cell)> {
            vec![(col("period", Kind::Text), Cell::from(self.period))]
        }

        fn sections(&self) -> Vec<Section> {
            vec![
                Section {
                    name: "a",
                    title: "A".to_owned(),
                    columns: A,
                    rows: self
                        .a
                        .iter()
                        .map(|n| vec![Cell::from(*n), Cell::Float(*n as f64 / 3.0)])
                        .collect(),
                },
                Section {
                    name: "b",
                    title: "B".to_owned(),
                    columns: B,
                    rows: self
                        .b
                        .iter()
                        .map(|s| vec![Cell::from(*s), Cell::Null])
                        .collect(),
                },
            ]
        }
    }

    fn text(report: &Two, format: Format) -> String {
        String::from_utf8(to_bytes(report, format).unwrap()).unwrap()
    }

    #[test]
    fn csv_leads_each_part_with_its_name_and_quotes_what_it_must() {
        let r = Two {
            period: "2026-11",
            a: vec![1, 2],
            b: vec!["x,y", "say \"hi\""],
        };
        assert_eq!(
            text(&r, Format::Csv),
            "section,n,ratio\na,1,0.33\na,2,0.67\n\nsection,name,n\nb,\"x,y\",\nb,\"say \"\"hi\"\"\",\n"
        );
    }

    #[test]
    fn the_arrow_schema_is_declared_not_inferred() {
        let full = Two {
            period: "2026-11",
            a: vec![1],
            b: vec!["x"],
        };
        let empty = Two {
            period: "2026-11",
            a: vec![],
            b: vec![],
        };
        let read = |r: &Two| {
            let bytes = to_bytes(r, Format::Arrow).unwrap();
            let reader =
                arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
                    .unwrap();
            let schema = reader.schema();
            let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
            (schema, batches)
        };
        let (schema, batches) = read(&full);
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["section", "period", "n", "name", "ratio"]);
        assert_eq!(schema.field(2).data_type(), &DataType::Int64);
        assert_eq!(schema.field(4).data_type(), &DataType::Float64);
        assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 2);
        let (empty_schema, none) = read(&empty);
        assert_eq!(empty_schema, schema);
        assert!(none.is_empty());
        assert_eq!(arrow_schema(&empty).unwrap(), schema);
    }

    #[test]
    fn tables_align_numbers_right_and_say_when_a_part_is_empty() {
        let r = Two {
            period: "2026-11",
            a: vec![5, 100],
            b: vec![],
        };
        assert_eq!(
            text(&r, Format::Table),
            "A\n    n  ratio\n    5   1.67\n  100  33.33\n\nB\n  (none)\n"
        );
    }
}
