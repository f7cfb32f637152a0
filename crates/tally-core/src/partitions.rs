//! The partition counts the events stream has had, and which partition holds a customer's
//! events of each time.
//!
//! The count can only grow, each time to a larger *level* of the stream's stored subjects
//! (the count it was made with, doubled: [`crate::subject::partition_levels`]): 16 → 64
//! splits every partition `q` into `q`, `q + 16`, `q + 32` and `q + 48`, since
//! `h mod 64 ≡ h mod 16 (mod 16)` for the FNV hash `h` the stream partitions by. A
//! partition made by a growth is the *child* of the partition its customers came from,
//! and it starts from that parent's state (counters, grants, seats, seen ids) once the
//! parent has handled every message stored before the growth.
//!
//! Every stored subject carries its partition at every level, on every replica alike, so
//! which partition a message belongs to follows from its subject and its sequence alone
//! ([`Partitions::owner`]): the count in force at its sequence picks the level.
//!
//! The history lives in the events stream's metadata as `16@4711,64`: 16 partitions for
//! the messages up to sequence 4711, 64 after.

use std::fmt;

use crate::subject::{Stored, partition_filter, partition_of};

/// The stream metadata key holding the history.
pub const METADATA_KEY: &str = "tally.partitions";
/// The most partitions a stream may have.
pub const MAX_PARTITIONS: u16 = 1024;

/// The partition counts in order, each with the last sequence stored under it (`None`
/// for the current one, and for a growth not finished).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitions {
    generations: Vec<Generation>,
    /// The counts the stream's stored subjects name a partition for, every count of the
    /// history among them.
    levels: Vec<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Generation {
    count: u16,
    /// The last stream sequence stored under this count; `None` for the current count.
    until: Option<u64>,
}

/// Where a child partition's customers were before it existed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub partition: u16,
    /// The count the parent partition belongs to.
    pub count: u16,
    /// Every message of the child's customers the parent holds is at or below this
    /// sequence.
    pub until: u64,
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
            levels: vec![count],
        }
    }

    /// The history on a stream whose stored subjects have these levels; an error when a
    /// count of the history is not one of them.
    pub fn with_levels(mut self, levels: Vec<u16>) -> Result<Partitions, BadPartitions> {
        self.levels = levels;
        self.check().map_err(|reason| BadPartitions {
            given: self.to_string(),
            reason,
        })?;
        Ok(self)
    }

    /// The partition counts the stream's stored subjects allow.
    pub fn levels(&self) -> &[u16] {
        &self.levels
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
        let levels = generations.iter().map(|g| g.count).collect();
        let history = Partitions {
            generations,
            levels,
        };
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
            if !self.levels.contains(&g.count) {
                return Err(format!(
                    "the events stream's subjects name partitions for {:?} partitions, not for {}",
                    self.levels, g.count
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

    /// The history after growing to `count` partitions from sequence `until + 1` on.
    pub fn grow(&self, count: u16, until: u64) -> Result<Partitions, BadPartitions> {
        let mut grown = self.clone();
        for g in &mut grown.generations {
            g.until.get_or_insert(until);
        }
        grown.generations.push(Generation { count, until: None });
        grown.check().map_err(|reason| BadPartitions {
            given: count.to_string(),
            reason,
        })?;
        Ok(grown)
    }

    /// The partition count the message stored at `seq` belongs to.
    pub fn count_at(&self, seq: u64) -> u16 {
        self.generations
            .iter()
            .find(|g| g.until.is_none_or(|until| seq <= until))
            .map_or(1, |g| g.count)
    }

    /// The last sequence stored under an earlier count (0: the count never changed).
    pub fn last_switch(&self) -> u64 {
        self.generations
            .iter()
            .filter_map(|g| g.until)
            .max()
            .unwrap_or(0)
    }

    /// The partition the message stored at `seq` under `subject` belongs to.
    pub fn owner(&self, subject: &str, seq: u64) -> Option<u16> {
        let count = self.count_at(seq);
        let level = self.levels.iter().position(|&l| l == count)?;
        crate::subject::parse_partitioned(subject)
            .as_ref()
            .and_then(|stored: &Stored<'_>| stored.partition(level))
    }

    /// The first sequence `partition` can hold a message of: 1 for a partition of the
    /// first count, the sequence after the growth that made it for another; `None` when
    /// that growth is not finished (or the partition is past the current count).
    pub fn start(&self, partition: u16) -> Option<u64> {
        match self.born(partition)? {
            0 => Some(1),
            born => self.generations[born - 1].until.map(|until| until + 1),
        }
    }

    /// The consumer filter of every message `partition` holds from sequence `from` on:
    /// its number at the level of the count it was made at or the count in force at
    /// `from`, whichever is later. (A later count's messages of the partition are among
    /// them; those that went to its children are skipped by [`Partitions::owner`].)
    pub fn filter(&self, partition: u16, from: u64) -> Option<String> {
        let born = self.generations.get(self.born(partition)?)?.count;
        partition_filter(&self.levels, born.max(self.count_at(from)), partition)
    }

    /// The last sequence [`Partitions::filter`]`(partition, from)` serves: after it the
    /// partition's messages are under a narrower one. `None`: it serves on.
    pub fn filter_until(&self, partition: u16, from: u64) -> Option<u64> {
        let born = self.generations.get(self.born(partition)?)?.count;
        let count = born.max(self.count_at(from));
        self.generations.iter().find(|g| g.count == count)?.until
    }

    /// The filter of the messages `partition` held while the partition count was `count`.
    pub fn filter_at(&self, count: u16, partition: u16) -> Option<String> {
        partition_filter(&self.levels, count, partition)
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
            until: before.until?,
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
            if i + 1 < self.generations.len()
                && let Some(until) = g.until
            {
                write!(f, "@{until}")?;
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
        for text in ["16", "16@4711,64", "4@10,16@20,64", "1@0,2"] {
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
            "16@?,64",
        ] {
            assert!(Partitions::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_message_belongs_to_the_count_in_force_at_its_sequence() {
        let levels = crate::subject::partition_levels(16);
        let grown = Partitions::parse("16@900,32@2000,64")
            .unwrap()
            .with_levels(levels.clone())
            .unwrap();
        assert_eq!(grown.last_switch(), 2000);
        assert_eq!(
            [1, 900, 901, 2000, 2001].map(|s| grown.count_at(s)),
            [16, 16, 32, 32, 64]
        );
        // Stored at 5, 21, 53 at the levels 16, 32, 64.
        let subject = "tally.part.5.21.53.181.437.949.949.acme";
        assert_eq!(grown.owner(subject, 900), Some(5));
        assert_eq!(grown.owner(subject, 901), Some(21));
        assert_eq!(grown.owner(subject, 2001), Some(53));
        assert_eq!(
            [5, 21, 53, 60].map(|p| grown.start(p)),
            [Some(1), Some(901), Some(2001), Some(2001)]
        );
        assert_eq!(grown.start(64), None);
        // Partition 5 reads at its first level until it is past every growth.
        assert_eq!(
            grown.filter(5, 1).as_deref(),
            Some("tally.part.5.*.*.*.*.*.*.*")
        );
        assert_eq!(
            grown.filter(5, 1500).as_deref(),
            Some("tally.part.*.5.*.*.*.*.*.*")
        );
        assert_eq!(
            grown.filter(5, 2001).as_deref(),
            Some("tally.part.*.*.5.*.*.*.*.*")
        );
        assert_eq!(
            [1, 1500, 2001].map(|from| grown.filter_until(5, from)),
            [Some(900), Some(2000), None]
        );
        assert_eq!(grown.filter_until(21, 1), Some(2000));
        assert_eq!(
            grown.filter(53, 1).as_deref(),
            Some("tally.part.*.*.53.*.*.*.*.*")
        );
        assert!(Partitions::parse("16@900,24").is_err());
        assert!(
            Partitions::parse("16@900,64")
                .unwrap()
                .with_levels(vec![16])
                .is_err()
        );
    }

    #[test]
    fn growing_splits_each_partition_into_its_residues() {
        let sixteen = Partitions::fixed(16)
            .with_levels(crate::subject::partition_levels(16))
            .unwrap();
        let grown = sixteen.grow(64, 900).unwrap();
        assert_eq!(grown.to_string(), "16@900,64");
        assert_eq!(grown.current(), 64);
        assert!(sixteen.grow(24, 900).is_err(), "not a level");
        assert!(sixteen.grow(16, 900).is_err());
        assert!(
            Partitions::fixed(16).grow(64, 900).is_err(),
            "a stream of one level cannot grow"
        );
        assert_eq!(grown.parent(3), None);
        assert_eq!(
            grown.parent(35),
            Some(Parent {
                partition: 3,
                count: 16,
                until: 900
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
