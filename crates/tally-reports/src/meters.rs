//! A meter query's answer in OpenMeter's shape (`MeterQueryResult`), as JSON or CSV: the
//! API's meter routes and `tally meters query` write it from here, the same bytes.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use tally_core::meter::Tz;
use tally_query::meters::{MeterQuery, MeterRow};
use utoipa::ToSchema;

/// A meter query's answer, as OpenMeter's `MeterQueryResult`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeterQueryResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_size: Option<String>,
    pub data: Vec<MeterQueryRow>,
}

/// One row: a window's value for a customer (when grouped by it) and group-by values.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeterQueryRow {
    pub value: f64,
    pub window_start: String,
    pub window_end: String,
    /// The customer, when grouped by `subject`; `null` otherwise.
    pub subject: Option<String>,
    /// The customer, when grouped by `customer_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    pub group_by: BTreeMap<String, Option<String>>,
}

impl MeterQueryResult {
    /// The answer to `query` made of `rows`, times written in the query's time zone.
    pub fn new(query: &MeterQuery, rows: Vec<MeterRow>) -> MeterQueryResult {
        let by_subject = query.group_by.iter().any(|g| g == "subject");
        let by_customer = query.group_by.iter().any(|g| g == "customer_id");
        let zone = query.time_zone;
        let data = rows
            .into_iter()
            .map(|r| MeterQueryRow {
                value: r.value,
                window_start: stamp(r.window_start, zone),
                window_end: stamp(r.window_end, zone),
                subject: r.customer.clone().filter(|_| by_subject),
                customer_id: r.customer.filter(|_| by_customer),
                group_by: r.group_by,
            })
            .collect();
        MeterQueryResult {
            from: query.from.map(|t| stamp(t, zone)),
            to: query.to.map(|t| stamp(t, zone)),
            window_size: query.window.map(|w| w.as_str().to_owned()),
            data,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain data")
    }

    /// A header, then one line per row: `window_start, window_end, subject, customer_id`,
    /// each group-by of `names`, `value`.
    pub fn to_csv(&self, names: &[String]) -> String {
        let mut out = String::from("window_start,window_end,subject,customer_id");
        for n in names {
            out.push(',');
            out.push_str(&field(n));
        }
        out.push_str(",value\n");
        for row in &self.data {
            let mut cells = vec![
                field(&row.window_start),
                field(&row.window_end),
                field(row.subject.as_deref().unwrap_or("")),
                field(row.customer_id.as_deref().unwrap_or("")),
            ];
            for n in names {
                cells.push(field(
                    row.group_by
                        .get(n)
                        .cloned()
                        .flatten()
                        .as_deref()
                        .unwrap_or(""),
                ));
            }
            cells.push(row.value.to_string());
            out.push_str(&cells.join(","));
            out.push('\n');
        }
        out
    }
}

/// The group-bys of `query` that are the meter's own (not `subject`, `customer_id`).
pub fn named_group_by(query: &MeterQuery) -> Vec<String> {
    query
        .group_by
        .iter()
        .filter(|g| g.as_str() != "subject" && g.as_str() != "customer_id")
        .cloned()
        .collect()
}

/// A time as OpenMeter writes it: UTC with `Z`, or in the query's time zone.
fn stamp(t: DateTime<Utc>, zone: Tz) -> String {
    if zone == Tz::UTC {
        t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    } else {
        t.with_timezone(&zone)
            .to_rfc3339_opts(SecondsFormat::AutoSi, false)
    }
}

fn field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}
