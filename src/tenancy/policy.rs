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
}
