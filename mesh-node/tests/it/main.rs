//! Mesh tests with real processes: the coordinator binary, the `flotilla` CLI publishing and
//! exporting, `flotilla-mesh serve` site caches (one of them corrupting what it serves), and
//! `flotilla-agent` devices fetching peer-first: on loopback with static bootstrap peers
//! (mDNS ignores loopback), and as a site of hosts in network namespaces with mDNS and a
//! shaped origin link; an offline site (no coordinator, no CDN) installing from an imported
//! export under its signed rollout directive.

mod loopback;
mod netns;
mod offline;
mod support;
