//! Accumulates decided events of one partition as Arrow columns of the lake schema.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, ArrowPrimitiveType, Float64Builder, PrimitiveArray, PrimitiveBuilder, RecordBatch,
    StringBuilder, TimestampMicrosecondBuilder, UInt8Builder, UInt16Builder, UInt64Builder,
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
    plan: StringBuilder,
    decision_code: UInt8Builder,
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
            plan: StringBuilder::new(),
            decision_code: UInt8Builder::new(),
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

    /// Appends one decided event and the plan that decided it. `ingest_micros` also
    /// stands in for a missing event time.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        event: &Event<'_>,
        decision: Decision,
        plan: Option<&str>,
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
        self.plan.append_option(plan);
        self.decision_code.append_value(decision.code());
        self.len += 1;
    }

    /// Takes the rows as a record batch and leaves the builders empty, sized like the batch
    /// just taken: the next one grows without a chain of reallocations and copies.
    pub fn finish(&mut self) -> RecordBatch {
        let rows = self.len;
        let text = |b: &mut StringBuilder| -> ArrayRef {
            let array = b.finish();
            *b = StringBuilder::with_capacity(rows, array.value_data().len());
            Arc::new(array)
        };
        let utc = |b: &mut TimestampMicrosecondBuilder| -> ArrayRef {
            Arc::new(take(b, rows).with_timezone("UTC"))
        };
        let columns: Vec<ArrayRef> = vec![
            text(&mut self.event_id),
            text(&mut self.customer),
            text(&mut self.feature),
            Arc::new(take(&mut self.quantity, rows)),
            utc(&mut self.event_time),
            text(&mut self.region),
            text(&mut self.user_id),
            text(&mut self.source),
            text(&mut self.event_type),
            text(&mut self.data),
            text(&mut self.decision),
            utc(&mut self.ingest_time),
            Arc::new(take(&mut self.stream_seq, rows)),
            Arc::new(take(&mut self.partition_id, rows)),
            text(&mut self.plan),
            Arc::new(take(&mut self.decision_code, rows)),
        ];
        self.len = 0;
        // The columns are built in schema order from the schema's own types.
        RecordBatch::try_new(lake_schema(), columns).expect("rows match the lake schema")
    }
}

/// Finishes a primitive builder and leaves a fresh one with room for `rows` values.
fn take<T: ArrowPrimitiveType>(b: &mut PrimitiveBuilder<T>, rows: usize) -> PrimitiveArray<T> {
    let array = b.finish();
    *b = PrimitiveBuilder::with_capacity(rows);
    array
}
