//! Each tenant's configured limits as gauges, `imgsvc_tenant_limit{tenant,
//! limit}`, beside the usage series the tenancy code records, so "which
//! tenant is near which limit" is one PromQL ratio (the monitoring kit's
//! `imgsvc:tenant_limit_usage:ratio`; docs/operations.md#metrics).
//!
//! Published when the tenancy starts and again on every reload
//! ([`crate::tenancy::Tenancy::reconfigure`]). A tenant removed by a reload,
//! or a limit it no longer has (a rate limit switched off), is set to NaN:
//! the exporter cannot drop a series, and NaN compares false, so no alert
//! fires on it. Labels are bounded: one series per configured tenant and
//! [`Limit`] (plus `(defaults)` when unknown tenants are served with
//! `[tenant_defaults]`).

use metrics::{describe_gauge, gauge};

use crate::tenancy::policy::{TenancyConfig, TenantPolicy, UnknownTenants};

pub const TENANT_LIMIT: &str = "imgsvc_tenant_limit";

/// The `tenant` label of `[tenant_defaults]`, published when unknown
/// tenants are served with them; no tenant name can take this form.
pub const DEFAULTS_TENANT: &str = "(defaults)";

/// The `limit` label values and the usage series each one bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `max_concurrent_requests + max_queued_requests`: calls admitted at
    /// once; usage `imgsvc_tenant_calls_open`.
    Calls,
    /// `max_concurrent_requests`: jobs running at once.
    ConcurrentRequests,
    /// `max_queued_requests`; usage `imgsvc_queue_depth`.
    QueuedRequests,
    /// The tenant's share of the memory budget; usage
    /// `imgsvc_tenant_memory_held_bytes` (summed over stages).
    MemoryBytes,
    /// `requests_per_second` (absent when the tenant has no rate limit);
    /// usage the rate of `imgsvc_requests_total`.
    RequestsPerSecond,
    /// `burst` of the token bucket.
    Burst,
    /// `max_request_bytes`, per request.
    RequestBytes,
    /// `max_image_pixels`, per image.
    ImagePixels,
    /// `max_connections`; usage `imgsvc_tenant_connections`.
    Connections,
}

impl Limit {
    pub const ALL: [Limit; 9] = [
        Limit::Calls,
        Limit::ConcurrentRequests,
        Limit::QueuedRequests,
        Limit::MemoryBytes,
        Limit::RequestsPerSecond,
        Limit::Burst,
        Limit::RequestBytes,
        Limit::ImagePixels,
        Limit::Connections,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Limit::Calls => "calls",
            Limit::ConcurrentRequests => "concurrent_requests",
            Limit::QueuedRequests => "queued_requests",
            Limit::MemoryBytes => "memory_bytes",
            Limit::RequestsPerSecond => "requests_per_second",
            Limit::Burst => "burst",
            Limit::RequestBytes => "request_bytes",
            Limit::ImagePixels => "image_pixels",
            Limit::Connections => "connections",
        }
    }

    /// The value `policy` sets, `None` where it sets no such limit.
    pub fn of(self, policy: &TenantPolicy) -> Option<f64> {
        Some(match self {
            Limit::Calls => f64::from(policy.max_concurrent_requests) + f64::from(policy.max_queued_requests),
            Limit::ConcurrentRequests => f64::from(policy.max_concurrent_requests),
            Limit::QueuedRequests => f64::from(policy.max_queued_requests),
            Limit::MemoryBytes => policy.max_memory_bytes as f64,
            Limit::RequestsPerSecond => policy.rate?.0,
            Limit::Burst => f64::from(policy.rate?.1),
            Limit::RequestBytes => policy.max_request_bytes as f64,
            Limit::ImagePixels => policy.max_image_pixels as f64,
            Limit::Connections => f64::from(policy.max_connections),
        })
    }
}

/// Every (tenant label, policy) a config puts in force.
fn published(config: &TenancyConfig) -> Vec<(String, &TenantPolicy)> {
    let mut out: Vec<(String, &TenantPolicy)> = config.tenants.iter().map(|(t, p)| (t.to_string(), p)).collect();
    if config.unknown_tenants == UnknownTenants::Defaults {
        out.push((DEFAULTS_TENANT.to_string(), &config.defaults));
    }
    out
}

/// Sets the gauges for `new`; series `old` had that `new` lacks become NaN.
pub fn publish(old: Option<&TenancyConfig>, new: &TenancyConfig) {
    describe_gauge!(TENANT_LIMIT, "Each tenant's configured limits, by tenant and limit (see docs/operations.md#metrics)");
    let current = published(new);
    for (tenant, policy) in &current {
        for limit in Limit::ALL {
            match limit.of(policy) {
                Some(value) => gauge!(TENANT_LIMIT, "tenant" => tenant.clone(), "limit" => limit.label()).set(value),
                None if old.is_some() => gauge!(TENANT_LIMIT, "tenant" => tenant.clone(), "limit" => limit.label()).set(f64::NAN),
                None => {}
            }
        }
    }
    for (tenant, _) in old.map(published).unwrap_or_default() {
        if !current.iter().any(|(t, _)| *t == tenant) {
            for limit in Limit::ALL {
                gauge!(TENANT_LIMIT, "tenant" => tenant.clone(), "limit" => limit.label()).set(f64::NAN);
            }
        }
    }
}
