//! Taking a partition over: the counters and seen event ids from its latest checkpoint,
//! then the lake's rows stored after it, replayed with the decisions they were stored with.
//!
//! What the lake holds is the truth. A message whose sequence is at or below the
//! checkpoint's, or inside a sealed batch found in the lake, is already counted and stored:
//! when JetStream delivers it again (it was never acknowledged, or acknowledged after the
//! crash) it is skipped. So counting nothing twice does not rest on JetStream's duplicate
//! window. Notices of the replayed rows that no ack covered are published again (their
//! message ids make that a no-op if they were already stored).

use arrow::array::{Array, AsArray, RecordBatch, StringArray};
use arrow::datatypes::{Float64Type, TimestampMicrosecondType, UInt64Type};
use tally_core::event::Event;
use tally_core::partitions::Partitions;
use tally_core::snapshot::Snapshot;
use tally_core::{Decision, Fence, schema};
use tally_quota::{Notice, Usage};
use tally_store::Lake;

use crate::dedup::Dedup;
use crate::entitlements::Entitlements;
use crate::{Error, Result};

/// What a partition's lake holds: skip these sequences when they are delivered again.
#[derive(Debug, Default)]
pub(crate) struct Committed {
    /// Every message up to here is counted (in the checkpoint or the replayed rows).
    upto: u64,
    /// Sealed batches in the lake past `upto`, in order.
    covered: Vec<(u64, u64)>,
}

impl Committed {
    /// The highest sequence the lake holds.
    pub(crate) fn last(&self) -> u64 {
        self.covered
            .last()
            .map_or(self.upto, |&(_, last)| last.max(self.upto))
    }

    /// Whether a delivered message is already in the lake. Sequences arrive in order, so
    /// ranges behind them are dropped as they pass.
    pub(crate) fn holds(&mut self, seq: u64) -> bool {
        if seq <= self.upto {
            return true;
        }
        while let Some(&(_, last)) = self.covered.first()
            && last < seq
        {
            self.covered.remove(0);
        }
        self.covered
            .first()
            .is_some_and(|&(first, last)| first <= seq && seq <= last)
    }
}

/// What recovery found, for the log and the stats.
#[derive(Debug, Default)]
pub(crate) struct Recovered {
    pub committed: Committed,
    pub checkpoint_seq: u64,
    /// Customer × feature counters the checkpoint held.
    pub counters: u64,
    pub replayed: u64,
    pub notices: Vec<Notice>,
    /// The last sequence the lake's log holds of the partition: the next batch follows it.
    pub version: u64,
}

/// A new partition's start from its parent (after the partition count grew): its
/// customers' state as the parent holds it, once the parent has handled every message
/// stored before the growth.
pub(crate) struct Inherit<'a> {
    pub parent: u16,
    pub partitions: &'a Partitions,
    /// Where the inherited state is written as the partition's first checkpoint.
    pub fence: &'a Fence,
}

/// Rebuilds a partition's counters and seen ids. Blocking: reads the lake.
///
/// A partition with no checkpoint of its own that a growth made (`inherit`) first takes
/// its customers' state from its parent: the parent's latest checkpoint and the parent's
/// rows after it, those of the partition's customers alone, read without writing; and
/// writes that state as its own first checkpoint (at sequence 0: none of its own
/// messages is in it), so that it never needs the parent again.
pub(crate) fn recover(
    lake: &Lake,
    partition: u16,
    ack_floor: u64,
    dedup: &mut Dedup,
    entitlements: Option<&Entitlements>,
    inherit: Option<Inherit<'_>>,
) -> Result<Recovered> {
    let store = |e: tally_store::Error| Error::Store(e.to_string());
    let own = lake.latest_checkpoint(partition).map_err(store)?;
    let inherit = inherit.filter(|_| own.is_none());
    let checkpoint = own.unwrap_or(Snapshot {
        partition,
        ..Snapshot::default()
    });
    let mut engine = entitlements.and_then(|e| e.engine(partition));
    let mut recovered = Recovered::default();
    let inherited = inherit.is_some();
    if let Some(inherit) = inherit {
        let parent = lake
            .latest_checkpoint(inherit.parent)
            .map_err(store)?
            .unwrap_or_default();
        let accounts: Vec<_> = parent
            .accounts
            .into_iter()
            .filter(|a| inherit.partitions.holds(partition, &a.customer))
            .collect();
        recovered.counters += accounts
            .iter()
            .map(|a| a.counters.len() as u64)
            .sum::<u64>();
        dedup.restore(&parent.seen);
        if let Some(engine) = engine.as_deref_mut() {
            engine.restore(accounts);
        }
        let tail = lake
            .rows_after(inherit.parent, parent.last_seq)
            .map_err(store)?;
        let mut notices = Vec::new();
        for rows in &tail.rows {
            let rows = Rows::of(rows)?;
            for i in 0..rows.len {
                if !inherit.partitions.holds(partition, rows.customer.value(i)) {
                    continue;
                }
                dedup.first_time(rows.id.value(i));
                recovered.replayed += 1;
                if let Some(engine) = engine.as_deref_mut() {
                    // The parent published these rows' notices before acknowledging them.
                    replay(engine, &rows, i, &mut notices);
                    notices.clear();
                }
            }
        }
        let first = Snapshot {
            partition,
            last_seq: 0,
            accounts: engine.as_deref().map(|e| e.snapshot()).unwrap_or_default(),
            seen: dedup.export(),
        };
        lake.write_checkpoint(&first, inherit.fence)
            .map_err(store)?;
        tracing::info!(
            partition,
            parent = inherit.parent,
            customers = first.accounts.len(),
            replayed = recovered.replayed,
            "partition started from its parent's state"
        );
    }
    let tail = lake.tail(partition, checkpoint.last_seq).map_err(store)?;
    recovered.checkpoint_seq = checkpoint.last_seq;
    recovered.counters += checkpoint
        .accounts
        .iter()
        .map(|a| a.counters.len() as u64)
        .sum::<u64>();
    // Restoring starts every customer the checkpoint does not name from nothing: not
    // after inheriting, whose state stands for the empty checkpoint of the partition's own.
    if !inherited {
        dedup.restore(&checkpoint.seen);
        if let Some(engine) = engine.as_deref_mut() {
            engine.restore(checkpoint.accounts);
        }
    }
    let mut notices = Vec::new();
    for rows in &tail.rows {
        let rows = Rows::of(rows)?;
        for i in 0..rows.len {
            dedup.first_time(rows.id.value(i));
            recovered.replayed += 1;
            let Some(engine) = engine.as_deref_mut() else {
                continue;
            };
            notices.clear();
            replay(engine, &rows, i, &mut notices);
            // An ack covers a message only once its notices were stored.
            if rows.seq[i] > ack_floor {
                recovered.notices.append(&mut notices);
            }
        }
    }
    recovered.version = tail.version;
    recovered.committed = Committed {
        upto: checkpoint.last_seq,
        covered: tail.covered,
    };
    Ok(recovered)
}

/// Replays row `i` with the decision it was stored with.
fn replay(engine: &mut tally_quota::Engine, rows: &Rows<'_>, i: usize, notices: &mut Vec<Notice>) {
    let Some(decision) = Decision::parse(rows.decision.value(i)) else {
        return;
    };
    fn text(column: &StringArray, i: usize) -> Option<&str> {
        column.is_valid(i).then(|| column.value(i))
    }
    let usage = Usage {
        customer: rows.customer.value(i),
        feature: rows.feature.value(i),
        quantity: rows.quantity[i],
        time: rows.time[i],
        region: text(rows.region, i),
        user: text(rows.user, i),
    };
    // Features bound to meters read the event again from its stored `data`.
    if let Some(bindings) = engine.bindings(rows.event_type.value(i)) {
        let event = Event {
            id: rows.id.value(i).into(),
            source: "".into(),
            event_type: rows.event_type.value(i).into(),
            subject: usage.customer.into(),
            time: None,
            feature: usage.feature.into(),
            quantity: usage.quantity,
            region: usage.region.map(Into::into),
            user: usage.user.map(Into::into),
            extra: text(rows.data, i).map(str::to_owned),
        };
        match tally_quota::readings(&bindings, &event, usage.time) {
            Ok(readings) if !readings.is_empty() => {
                engine.replay_readings(&usage, &readings, decision, notices);
                return;
            }
            Ok(_) => {}
            // Stored under definitions that read it: nothing the bindings of now can count.
            Err(_) => return,
        }
    }
    engine.replay(&usage, decision, notices);
}

/// The columns replay reads.
struct Rows<'a> {
    len: usize,
    id: &'a StringArray,
    customer: &'a StringArray,
    feature: &'a StringArray,
    quantity: &'a [f64],
    time: &'a [i64],
    region: &'a StringArray,
    user: &'a StringArray,
    event_type: &'a StringArray,
    data: &'a StringArray,
    decision: &'a StringArray,
    seq: &'a [u64],
}

impl<'a> Rows<'a> {
    fn of(batch: &'a RecordBatch) -> Result<Rows<'a>> {
        let column = |name: &'static str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| Error::Store(format!("a lake file has no {name} column")))
        };
        let text = |name: &'static str| -> Result<&'a StringArray> {
            column(name)?
                .as_string_opt::<i32>()
                .ok_or_else(|| Error::Store(format!("the lake's {name} column is not text")))
        };
        let wrong = |name: &str| Error::Store(format!("the lake's {name} column has another type"));
        Ok(Rows {
            len: batch.num_rows(),
            id: text(schema::EVENT_ID)?,
            customer: text(schema::CUSTOMER)?,
            feature: text(schema::FEATURE)?,
            quantity: column(schema::QUANTITY)?
                .as_primitive_opt::<Float64Type>()
                .ok_or_else(|| wrong(schema::QUANTITY))?
                .values(),
            time: column(schema::EVENT_TIME)?
                .as_primitive_opt::<TimestampMicrosecondType>()
                .ok_or_else(|| wrong(schema::EVENT_TIME))?
                .values(),
            region: text(schema::REGION)?,
            user: text(schema::USER_ID)?,
            event_type: text(schema::EVENT_TYPE)?,
            data: text(schema::DATA)?,
            decision: text(schema::DECISION)?,
            seq: column(schema::STREAM_SEQ)?
                .as_primitive_opt::<UInt64Type>()
                .ok_or_else(|| wrong(schema::STREAM_SEQ))?
                .values(),
        })
    }
}
