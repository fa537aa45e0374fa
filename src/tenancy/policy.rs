//! Per-tenant policy: what each tenant may do and how much, resolved from
//! `[tenant_defaults]` and `[tenants.<name>]`.

use std::{collections::HashMap, fmt};

use serde::Deserialize;

use crate::identity::TenantId;

/// An operation a tenant may be allowed to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    Rotate,
    MeanFilter,
}

impl Operation {
    pub const ALL: [Operation; 2] = [Operation::Rotate, Operation::MeanFilter];

    pub fn name(self) -> &'static str {
        match self {
            Operation::Rotate => "rotate",
            Operation::MeanFilter => "mean_filter",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|op| op.name() == name)
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What to do with a client whose tenant has no `[tenants.<name>]` table.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UnknownTenants {
    /// PERMISSION_DENIED (the default: deny unless configured).
    #[default]
    Refuse,
    /// Serve with `[tenant_defaults]`.
    Defaults,
}

/// A tenant's resolved limits.
#[derive(Clone, Debug, PartialEq)]
pub struct TenantPolicy {
    pub enabled: bool,
    /// Requests per second and burst; `None`: no rate limit.
    pub rate: Option<(f64, u32)>,
    pub max_concurrent_requests: u32,
    pub max_queued_requests: u32,
    pub max_image_pixels: u64,
    pub max_request_bytes: u64,
    /// Bytes this tenant's requests may hold at once (its share of the
    /// memory budget, see [`crate::tenancy::memory`]).
    pub max_memory_bytes: u64,
    /// Connections open at once (each tenant on its own, an unconfigured
    /// one served with the defaults too); counted from the handshake.
    pub max_connections: u32,
    /// Sorted, no duplicates.
    pub allowed_operations: Vec<Operation>,
    pub weight: u32,
}

impl TenantPolicy {
    pub fn allows(&self, op: Operation) -> bool {
        self.allowed_operations.contains(&op)
    }

    pub fn allowed_list(&self) -> String {
        if self.allowed_operations.is_empty() {
            return "none".into();
        }
        self.allowed_operations.iter().map(|o| o.name()).collect::<Vec<_>>().join(", ")
    }
}

/// All tenants' policies.
#[derive(Clone, Debug, PartialEq)]
pub struct TenancyConfig {
    pub unknown_tenants: UnknownTenants,
    /// Bytes held for requests (bodies being received, images queued and
    /// in flight, answers being sent) across all tenants.
    pub memory_budget_bytes: u64,
    /// How long a request waits for memory (its body not read) before it
    /// is refused.
    pub memory_wait: std::time::Duration,
    /// How long a request message's bytes may stop arriving, once its
    /// memory is charged, before the call is refused and the memory
    /// released.
    pub body_timeout: std::time::Duration,
    pub defaults: TenantPolicy,
    pub tenants: HashMap<TenantId, TenantPolicy>,
}

impl TenancyConfig {
    /// The policy for `tenant`, or `None` if it is not served at all.
    pub fn policy(&self, tenant: &TenantId) -> Option<&TenantPolicy> {
        self.tenants.get(tenant).or(match self.unknown_tenants {
            UnknownTenants::Defaults => Some(&self.defaults),
            UnknownTenants::Refuse => None,
        })
    }

    /// The weights that share the server's job queue and workers: every
    /// configured, enabled tenant, plus one part (the defaults' weight)
    /// that all unconfigured tenants share when they are served.
    pub fn total_weight(&self) -> u64 {
        let configured: u64 = self.tenants.values().filter(|p| p.enabled).map(|p| u64::from(p.weight)).sum();
        let unknown = match self.unknown_tenants {
            UnknownTenants::Defaults => u64::from(self.defaults.weight),
            UnknownTenants::Refuse => 0,
        };
        (configured + unknown).max(1)
    }

    /// The most calls a tenant of `weight` may have open at once (from
    /// their headers to the end of their answer; each has at most one job
    /// running or queued): its weighted part of `max_queued_jobs +
    /// workers`, at least 1. The parts of all tenants add up to at most
    /// that sum, so no tenant can fill the queue another is owed.
    pub fn jobs_part(&self, weight: u32, max_queued_jobs: usize, workers: usize) -> u32 {
        let capacity = (max_queued_jobs + workers) as u64;
        (capacity * u64::from(weight) / self.total_weight()).clamp(1, u64::from(u32::MAX)) as u32
    }

    /// The weighted part of `max_queued_jobs` alone (what a tenant may
    /// queue beyond its running jobs), for configuration checks.
    pub fn queue_part(&self, weight: u32, max_queued_jobs: usize) -> u64 {
        max_queued_jobs as u64 * u64::from(weight) / self.total_weight()
    }
}
