//! Retention: which of the layers a dataset's tags pointed at before garbage collection keeps,
//! per dataset, in `policy/<name>` (a record, JSON; `docs/FORMAT.md` §9).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use strata_store::Store;

use crate::error::{FsError, FsResult};

/// A dataset's retention policy. A layer a tag no longer points at is kept while either rule
/// keeps it; a policy with neither keeps every layer (as does a dataset with no policy, unless
/// the collector is given a default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub version: u32,
    /// Per tag, this many of the layers it pointed at before (the most recent first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_history: Option<u32>,
    /// Per tag, the layers it stopped pointing at within this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_within_secs: Option<u64>,
}

impl Policy {
    pub fn new(keep_history: Option<u32>, keep_within_secs: Option<u64>) -> Policy {
        Policy {
            version: 1,
            keep_history,
            keep_within_secs,
        }
    }

    /// Whether an earlier layer of a tag is kept: the `rank`-th most recent (0: the one right
    /// before the current), which the tag stopped pointing at at `ended` (seconds), at `now`.
    pub fn keeps(&self, rank: usize, ended: u64, now: u64) -> bool {
        match (self.keep_history, self.keep_within_secs) {
            (None, None) => true,
            (history, within) => {
                history.is_some_and(|n| rank < n as usize)
                    || within.is_some_and(|d| ended.saturating_add(d) >= now)
            }
        }
    }

    /// For people: `keep 3 earlier layers per tag, and those of the last 30d`.
    pub fn describe(&self) -> String {
        let within = self
            .keep_within_secs
            .map(|s| humantime::format_duration(std::time::Duration::from_secs(s)).to_string());
        match (self.keep_history, within) {
            (None, None) => "keep every earlier layer".into(),
            (Some(n), None) => format!("keep {n} earlier layer(s) per tag"),
            (None, Some(d)) => format!("keep the earlier layers of the last {d}"),
            (Some(n), Some(d)) => {
                format!("keep {n} earlier layer(s) per tag, and those of the last {d}")
            }
        }
    }
}

pub fn key(name: &str) -> String {
    format!("policy/{name}")
}

/// The policy of dataset `name`, if one was set.
pub async fn read(store: &Arc<dyn Store>, name: &str) -> FsResult<Option<Policy>> {
    let key = key(name);
    let body = match crate::record::get(store, &key).await {
        Ok(b) => b,
        Err(FsError::Store(e)) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e),
    };
    match serde_json::from_slice::<Policy>(&body) {
        Ok(p) if p.version == 1 => Ok(Some(p)),
        Ok(p) => Err(FsError::InvalidInput(format!(
            "{}: {key}: policy version {} is not one this strata reads",
            store.url(),
            p.version
        ))),
        Err(e) => Err(FsError::InvalidInput(format!(
            "{}: {key} is unreadable: {e}",
            store.url()
        ))),
    }
}

/// Sets the policy of dataset `name` (`None`: removes it, so every earlier layer is kept).
pub async fn write(store: &Arc<dyn Store>, name: &str, policy: Option<&Policy>) -> FsResult<()> {
    crate::refs::DatasetRef::parse(&format!("{name}:latest"))?;
    let key = key(name);
    match policy {
        Some(p) => {
            let json = serde_json::to_vec(p)
                .map_err(|e| FsError::InvalidInput(format!("encoding a policy: {e}")))?;
            store.put(&key, crate::record::seal(&json)).await?;
        }
        None => store.delete(&key).await?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn either_rule_keeps_a_layer_and_no_rule_keeps_all() {
        let day = 86_400;
        let now = 100 * day;
        assert!(Policy::new(None, None).keeps(500, 0, now));
        let two = Policy::new(Some(2), None);
        assert!(two.keeps(1, 0, now) && !two.keeps(2, now, now));
        let week = Policy::new(None, Some(7 * day));
        assert!(week.keeps(9, now - 7 * day, now) && !week.keeps(0, now - 7 * day - 1, now));
        let both = Policy::new(Some(1), Some(day));
        assert!(both.keeps(0, 0, now), "the count keeps it");
        assert!(both.keeps(5, now - 10, now), "the time keeps it");
        assert!(!both.keeps(1, now - 2 * day, now));
        let none = Policy::new(Some(0), None);
        assert!(
            !none.keeps(0, now, now),
            "keep-history 0 keeps only the current layer"
        );
    }

    #[tokio::test]
    async fn a_policy_is_written_read_and_removed() {
        let store: Arc<dyn Store> = Arc::new(strata_store::MemoryStore::new("policy"));
        assert_eq!(read(&store, "ds").await.unwrap(), None);
        let p = Policy::new(Some(3), Some(60));
        write(&store, "ds", Some(&p)).await.unwrap();
        assert_eq!(read(&store, "ds").await.unwrap(), Some(p));
        write(&store, "ds", None).await.unwrap();
        assert_eq!(read(&store, "ds").await.unwrap(), None);
        assert!(write(&store, "../x", Some(&p)).await.is_err());
        store
            .put(
                "policy/bad",
                crate::record::seal(b"{\"version\":1,\"keep\":1}"),
            )
            .await
            .unwrap();
        assert!(
            read(&store, "bad").await.is_err(),
            "an unknown field is not ignored"
        );
    }
}
