//! The definitions a report reads: plans, add-ons and customers as they are now, by id.

use std::collections::{BTreeMap, BTreeSet};

use tally_core::entitlement::{AddOn, Catalog, Customer, Effective, Entitlement, Plan};
use tally_ingest::definitions::Snapshot;

/// Plans, add-ons and customers by id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Definitions {
    pub plans: BTreeMap<String, Plan>,
    pub addons: BTreeMap<String, AddOn>,
    pub customers: BTreeMap<String, Customer>,
}

impl Definitions {
    pub fn new(plans: Vec<Plan>, addons: Vec<AddOn>, customers: Vec<Customer>) -> Self {
        Self {
            plans: plans.into_iter().map(|p| (p.id.clone(), p)).collect(),
            addons: addons.into_iter().map(|a| (a.id.clone(), a)).collect(),
            customers: customers.into_iter().map(|c| (c.id.clone(), c)).collect(),
        }
    }

    /// A catalogue file's plans and add-ons, with `customers`.
    pub fn of_catalog(catalog: Catalog, customers: Vec<Customer>) -> Self {
        Self::new(catalog.plans, catalog.addons, customers)
    }

    /// Reads them from the key-value buckets, through `definitions`' connection.
    pub async fn load(
        definitions: &tally_ingest::definitions::Definitions,
    ) -> tally_ingest::Result<Self> {
        Ok(Self::from(definitions.load().await?))
    }

    /// `feature` for `customer` (its add-ons; none when undefined) on `plan`, by the rule
    /// the quota engine enforces ([`Effective`]); `None`: the plan lacks it or does not
    /// exist.
    pub fn effective(
        &self,
        plan: &str,
        customer: Option<&Customer>,
        feature: &str,
    ) -> Option<Effective<'_>> {
        let plan = self.plans.get(plan)?;
        let held: Vec<(&AddOn, u32)> = customer
            .map(|c| {
                c.addons
                    .iter()
                    .filter_map(|r| self.addons.get(&r.id).map(|a| (a, r.quantity)))
                    .collect()
            })
            .unwrap_or_default();
        Effective::of(plan, &held, feature)
    }

    /// Whether `customer`, on its plan, may use `feature`.
    pub fn entitled(&self, customer: &Customer, feature: &str) -> bool {
        self.effective(&customer.plan, Some(customer), feature)
            .is_some_and(|e| e.entitles())
    }

    /// Every feature a plan or an add-on lists.
    pub fn features(&self) -> BTreeSet<String> {
        let plans = self.plans.values().flat_map(|p| p.features.keys());
        let addons = self.addons.values().flat_map(|a| a.features.keys());
        plans.chain(addons).cloned().collect()
    }

    /// Features some plan entitles to.
    pub fn offered(&self) -> BTreeSet<&str> {
        self.plans
            .values()
            .flat_map(|p| p.features.iter())
            .filter(|(_, e)| !matches!(e, Entitlement::Boolean { enabled: false }))
            .map(|(f, _)| f.as_str())
            .collect()
    }
}

impl From<Snapshot> for Definitions {
    fn from(s: Snapshot) -> Self {
        Self::new(s.plans, s.addons, s.customers)
    }
}
