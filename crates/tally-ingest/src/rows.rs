//! Accumulates decided events of one partition as Arrow columns of the lake schema.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Float64Builder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
    UInt16Builder, UInt64Builder,
};
use tally_core::schema::lake_schema;
use tally_core::{Decision, Event};

/// Column builders for one partition's open batch.
pub struct Rows {
    event_id: StringBuilder,
    customer: StringBuilder,
    feature: StringBuilder,
    quantity: Float64Builder,
    event_time: TimestampMicrosecondBuilder,
    region: StringBuilder,
    user_id: StringBuilder,
    source: StringBuilder,
    event_type: StringBuilder,
    data: StringBuilder,
    decision: StringBuilder,
    ingest_time: TimestampMicrosecondBuilder,
    stream_seq: UInt64Builder,
    partition_id: UInt16Builder,
    len: usize,
}

impl Default for Rows {
    fn default() -> Self {
        Self {
            event_id: StringBuilder::new(),
            customer: StringBuilder::new(),
            feature: StringBuilder::new(),
            quantity: Float64Builder::new(),
            event_time: TimestampMicrosecondBuilder::new(),
            region: StringBuilder::new(),
            user_id: StringBuilder::new(),
            source: StringBuilder::new(),
            event_type: StringBuilder::new(),
            data: StringBuilder::new(),
            decision: StringBuilder::new(),
            ingest_time: TimestampMicrosecondBuilder::new(),
            stream_seq: UInt64Builder::new(),
            partition_id: UInt16Builder::new(),
            len: 0,
        }
    }
}

impl Rows {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends one decided event. `ingest_micros` also stands in for a missing event time.
    pub fn push(
        &mut self,
        event: &Event<'_>,
        decision: Decision,
        ingest_micros: i64,
        stream_seq: u64,
        partition: u16,
    ) {
        self.event_id.append_value(&event.id);
        self.customer.append_value(&event.subject);
        self.feature.append_value(&event.feature);
        self.quantity.append_value(event.quantity);
        self.event_time
            .append_value(event.time.map_or(ingest_micros, |t| t.timestamp_micros()));
        self.region.append_option(event.region.as_deref());
        self.user_id.append_option(event.user.as_deref());
        self.source.append_value(&event.source);
        self.event_type.append_value(&event.event_type);
        self.data.append_option(event.extra.as_deref());
        self.decision.append_value(decision.as_str());
        self.ingest_time.append_value(ingest_micros);
        self.stream_seq.append_value(stream_seq);
        self.partition_id.append_value(partition);
        self.len += 1;
    }

    /// Takes the rows as a record batch and leaves the builders empty.
    pub fn finish(&mut self) -> RecordBatch {
        let utc = |b: &mut TimestampMicrosecondBuilder| -> ArrayRef {
            Arc::new(b.finish().with_timezone("UTC"))
        };
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.event_id.finish()),
            Arc::new(self.customer.finish()),
            Arc::new(self.feature.finish()),
            Arc::new(self.quantity.finish()),
            utc(&mut self.event_time),
            Arc::new(self.region.finish()),
            Arc::new(self.user_id.finish()),
            Arc::new(self.source.finish()),
            Arc::new(self.event_type.finish()),
            Arc::new(self.data.finish()),
            Arc::new(self.decision.finish()),
            utc(&mut self.ingest_time),
            Arc::new(self.stream_seq.finish()),
            Arc::new(self.partition_id.finish()),
        ];
        self.len = 0;
        // The columns are built in schema order from the schema's own types.
        RecordBatch::try_new(lake_schema(), columns).expect("rows match the lake schema")
    }
}
