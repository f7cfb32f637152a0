//! The partition counts the events stream has had, and which partition holds a customer's
//! events of each time.
//!
//! The count can only grow, each time to a multiple of the one before (`tally partitions
//! grow`): 16 → 64 splits every partition `q` into `q`, `q + 16`, `q + 32` and `q + 48`,
//! since `h mod 64 ≡ h mod 16 (mod 16)` for the FNV hash `h` the stream partitions by. A
//! partition made by a growth is the *child* of the partition its customers came from,
//! and it starts from that parent's state (counters, grants, seats, seen ids) once the
//! parent has handled every message stored before the growth.
//!
//! The history lives in the events stream's metadata, beside the subject transform it
//! describes, as `16@4711,64`: 16 partitions for the messages up to sequence 4711, 64
//! after. `16@?,64` is a growth whose switch sequence is not written yet (the growing
//! command stopped between its two updates; running it again finishes it): children wait.

use std::fmt;

use crate::subject::partition_of;

/// The stream metadata key holding the history.
pub const METADATA_KEY: &str = "tally.partitions";
/// The most partitions a stream may have.
pub const MAX_PARTITIONS: u16 = 1024;

/// The partition counts in order, each with the last sequence stored under it (`None`
/// for the current one, and for a growth not finished).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitions {
    generations: Vec<Generation>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Generation {
    count: u16,
    /// The last stream sequence stored under this count; `None`: the current count, or
    /// not yet known.
    until: Option<u64>,
}

/// Where a child partition's customers were before it existed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub partition: u16,
    /// The count the parent partition belongs to.
    pub count: u16,
    /// Every message of the child's customers stored under the parent is at or below this
    /// sequence; `None` until the growth is finished.
    pub until: Option<u64>,
}

/// A history that cannot be read, or a growth that is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("partitions {given:?}: {reason}")]
pub struct BadPartitions {
    pub given: String,
    pub reason: String,
}

impl Partitions {
    /// A stream that has always had `count` partitions.
    pub fn fixed(count: u16) -> Partitions {
        Partitions {
            generations: vec![Generation { count, until: None }],
        }
    }

    /// Reads a history written by [`fmt::Display`].
    pub fn parse(text: &str) -> Result<Partitions, BadPartitions> {
        let bad = |reason: String| BadPartitions {
            given: text.to_owned(),
            reason,
        };
        let mut generations = Vec::new();
        let parts: Vec<&str> = text.split(',').map(str::trim).collect();
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let (count, until) = match part.split_once('@') {
                Some((count, "?")) if !last => (count, None),
                Some((count, until)) if !last => {
                    let until = until
                        .parse::<u64>()
                        .map_err(|e| bad(format!("sequence {until:?}: {e}")))?;
                    (count, Some(until))
                }
                None if last => (*part, None),
                _ => return Err(bad(format!("{part:?} is out of place"))),
            };
            let count = count
                .parse::<u16>()
                .map_err(|e| bad(format!("count {count:?}: {e}")))?;
            generations.push(Generation { count, until });
        }
        let history = Partitions { generations };
        history.check().map_err(bad)?;
        Ok(history)
    }

    fn check(&self) -> Result<(), String> {
        let mut before: Option<Generation> = None;
        for g in &self.generations {
            if g.count == 0 || g.count > MAX_PARTITIONS {
                return Err(format!(
                    "{} partitions is not 1 to {MAX_PARTITIONS}",
                    g.count
                ));
            }
            if let Some(b) = before {
                if g.count <= b.count || g.count % b.count != 0 {
                    return Err(format!(
                        "{} partitions cannot follow {}: a growth is to a larger multiple",
                        g.count, b.count
                    ));
                }
                if let (Some(a), Some(z)) = (b.until, g.until)
                    && z < a
                {
                    return Err(format!("sequence {z} is before {a}"));
                }
            }
            before = Some(*g);
        }
        Ok(())
    }

    /// The partition count now.
    pub fn current(&self) -> u16 {
        self.generations.last().map_or(1, |g| g.count)
    }

    /// Whether a growth is written but not finished (its switch sequence unknown).
    pub fn unfinished(&self) -> bool {
        let n = self.generations.len();
        self.generations[..n.saturating_sub(1)]
            .iter()
            .any(|g| g.until.is_none())
    }

    /// The history after growing to `count` partitions, with the switch sequence not yet
    /// known ([`Partitions::finish`] writes it).
    pub fn grow(&self, count: u16) -> Result<Partitions, BadPartitions> {
        let mut grown = self.clone();
        grown.generations.push(Generation { count, until: None });
        grown.check().map_err(|reason| BadPartitions {
            given: count.to_string(),
            reason,
        })?;
        Ok(grown)
    }

    /// Writes `until` as the last sequence of every count before the current one that
    /// has none.
    pub fn finish(&mut self, until: u64) {
        let n = self.generations.len();
        for g in &mut self.generations[..n.saturating_sub(1)] {
            g.until.get_or_insert(until);
        }
    }

    /// The count `partition` was made at: the first one larger than it.
    fn born(&self, partition: u16) -> Option<usize> {
        self.generations.iter().position(|g| partition < g.count)
    }

    /// Where `partition`'s customers were before it existed; `None` for a partition of
    /// the first count (or one past the current count).
    pub fn parent(&self, partition: u16) -> Option<Parent> {
        let born = self.born(partition)?;
        let before = *self.generations.get(born.checked_sub(1)?)?;
        Some(Parent {
            partition: partition % before.count,
            count: before.count,
            until: before.until,
        })
    }

    /// Whether `partition` holds `customer`'s state: the partition the customer was in
    /// when `partition` was made. A partition of an earlier count holds the customers of
    /// all its children too (their messages from before the growth are its to decide);
    /// the partition a customer's new messages go to is
    /// `partition_of(customer, self.current())`, which holds it as well.
    pub fn holds(&self, partition: u16, customer: &str) -> bool {
        match self.born(partition) {
            Some(born) => partition_of(customer, self.generations[born].count) == partition,
            None => false,
        }
    }

    /// Every partition that holds `customer` ([`Partitions::holds`]), oldest first.
    pub fn homes(&self, customer: &str) -> Vec<u16> {
        self.generations
            .iter()
            .map(|g| partition_of(customer, g.count))
            .enumerate()
            .filter(|&(i, p)| self.born(p) == Some(i))
            .map(|(_, p)| p)
            .collect()
    }
}

impl fmt::Display for Partitions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, g) in self.generations.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}", g.count)?;
            if i + 1 < self.generations.len() {
                match g.until {
                    Some(until) => write!(f, "@{until}")?,
                    None => f.write_str("@?")?,
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histories_read_back_as_written() {
        for text in ["16", "16@4711,64", "4@10,16@?,64", "1@0,2"] {
            assert_eq!(Partitions::parse(text).unwrap().to_string(), text);
        }
        for bad in [
            "",
            "16@5",
            "16,64",
            "16@x,64",
            "16@9,24",
            "64@9,16",
            "0",
            "2048",
            "16@9,64@3,128",
        ] {
            assert!(Partitions::parse(bad).is_err(), "{bad}");
        }
        assert!(Partitions::parse("16@?,64").unwrap().unfinished());
        assert!(!Partitions::parse("16@7,64").unwrap().unfinished());
    }

    #[test]
    fn growing_splits_each_partition_into_its_residues() {
        let mut grown = Partitions::fixed(16).grow(64).unwrap();
        assert_eq!(grown.to_string(), "16@?,64");
        grown.finish(900);
        assert_eq!(grown.to_string(), "16@900,64");
        assert_eq!(grown.current(), 64);
        assert!(Partitions::fixed(16).grow(24).is_err());
        assert!(Partitions::fixed(16).grow(16).is_err());
        assert_eq!(grown.parent(3), None);
        assert_eq!(
            grown.parent(35),
            Some(Parent {
                partition: 3,
                count: 16,
                until: Some(900)
            })
        );
        // Every customer: held by its old partition and by its new one, and by no other.
        for i in 0..2000 {
            let customer = format!("cust-{i}");
            let (old, new) = (partition_of(&customer, 16), partition_of(&customer, 64));
            assert_eq!(new % 16, old);
            let homes = grown.homes(&customer);
            if new == old {
                assert_eq!(homes, vec![old]);
            } else {
                assert_eq!(homes, vec![old, new]);
                assert_eq!(grown.parent(new).unwrap().partition, old);
            }
            for p in 0..64 {
                assert_eq!(
                    grown.holds(p, &customer),
                    homes.contains(&p),
                    "{customer} {p}"
                );
            }
        }
    }
}
