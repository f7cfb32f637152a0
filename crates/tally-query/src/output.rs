//! Writes a query's result as it streams: each record batch is encoded and flushed when
//! it arrives, so a result of any size passes through a bounded amount of memory.
//!
//! - JSON: one JSON array of row objects, `[` first and `]` last (`[]` when there are no
//!   rows). Every object has every column; a null is written as `null`.
//! - CSV: a header row, then one line per row (also the header alone when there are no
//!   rows). Nested columns (lists, structs) cannot be written as CSV: cast or unnest them.
//! - Arrow: an Arrow IPC stream (schema, batches, end-of-stream marker), for tools that
//!   read Arrow (pyarrow, polars, DuckDB).

use std::io::Write;

use datafusion::arrow::array::RecordBatch;
use datafusion::execution::SendableRecordBatchStream;
use futures::StreamExt;

use crate::sql::SqlError;

/// How a streamed result is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// One JSON array of row objects.
    Json,
    /// CSV with a header row.
    Csv,
    /// An Arrow IPC stream.
    Arrow,
}

/// Writes `stream` to `out` in `format`, batch by batch, flushing after each; answers the
/// rows written. An error of the stream (the time or memory limit) stops the writing and
/// is returned; what was written before it stays written.
pub async fn write_stream<W: Write>(
    mut stream: SendableRecordBatchStream,
    format: OutputFormat,
    out: W,
) -> Result<u64, SqlError> {
    let schema = stream.schema();
    let mut writer = match format {
        OutputFormat::Json => Encoder::Json(
            arrow::json::WriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, arrow::json::writer::JsonArray>(out),
        ),
        OutputFormat::Csv => Encoder::Csv { out, wrote: false },
        OutputFormat::Arrow => {
            Encoder::Arrow(arrow::ipc::writer::StreamWriter::try_new(out, &schema)?)
        }
    };
    let mut rows = 0;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(SqlError::from)?;
        rows += batch.num_rows() as u64;
        writer.write(&batch)?;
    }
    if let Encoder::Csv { wrote: false, .. } = writer {
        // The header alone.
        writer.write(&RecordBatch::new_empty(schema))?;
    }
    writer.finish()?;
    Ok(rows)
}

enum Encoder<W: Write> {
    Json(arrow::json::Writer<W, arrow::json::writer::JsonArray>),
    /// Each batch is encoded on its own (the header before the first), so it reaches
    /// `out` whole rather than when the CSV writer's buffer fills.
    Csv {
        out: W,
        wrote: bool,
    },
    Arrow(arrow::ipc::writer::StreamWriter<W>),
}

impl<W: Write> Encoder<W> {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), SqlError> {
        match self {
            Encoder::Json(w) => {
                w.write(batch)?;
                w.get_mut().flush()?;
            }
            Encoder::Csv { out, wrote } => {
                let mut writer = arrow::csv::WriterBuilder::new()
                    .with_header(!*wrote)
                    .build(Vec::new());
                writer.write(batch)?;
                out.write_all(&writer.into_inner())?;
                out.flush()?;
                *wrote = true;
            }
            Encoder::Arrow(w) => {
                w.write(batch)?;
                w.flush()?;
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<(), SqlError> {
        match self {
            Encoder::Json(mut w) => {
                w.finish()?;
                let mut out = w.into_inner();
                out.write_all(b"\n")?;
                out.flush()?;
            }
            Encoder::Csv { mut out, .. } => out.flush()?,
            Encoder::Arrow(mut w) => {
                w.finish()?;
                w.into_inner()?.flush()?;
            }
        }
        Ok(())
    }
}
