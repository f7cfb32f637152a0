//! The lake as the query engine lists it: the files of each table's newest snapshot, and
//! only those.
//!
//! The events and rollups tables are Delta tables: their directories (key prefixes) hold files a
//! flush uploaded but has not committed yet (or never will: a crash, a worker that lost
//! its partition) and files a compaction replaced, kept a while for queries planned
//! before. A plain directory listing would count both. [`LakeStore`] answers every
//! listing under a table's directory from the table's newest snapshot instead (no
//! directory is listed at all), so a query sees each event once, whatever compaction and
//! ingest do meanwhile, and reads exactly what any other Delta reader would.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::object_store::path::Path;
use datafusion::object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use tally_store::Lake;

/// The lake's store (the local filesystem or an S3 bucket), listing the lake's tables as
/// their snapshots say.
#[derive(Debug, Clone)]
pub(crate) struct LakeStore {
    inner: Arc<dyn ObjectStore>,
    lake: Lake,
    tables: Vec<(&'static str, Path)>,
}

impl LakeStore {
    pub(crate) fn new(lake: Lake) -> LakeStore {
        let storage = lake.storage();
        let tables = [tally_core::schema::EVENTS_TABLE, tally_store::ROLLUPS_TABLE]
            .into_iter()
            .map(|name| (name, storage.key(name)))
            .collect();
        LakeStore {
            inner: storage.root_store(),
            lake,
            tables,
        }
    }

    /// The table whose directory holds `prefix`, or that `prefix` is above.
    fn tables_under(&self, prefix: Option<&Path>) -> Vec<(&'static str, Path)> {
        self.tables
            .iter()
            .filter(|(_, dir)| match prefix {
                None => true,
                Some(p) => p.prefix_match(dir).is_some() || dir.prefix_match(p).is_some(),
            })
            .cloned()
            .collect()
    }

    fn in_a_table(&self, prefix: &Path) -> bool {
        self.tables
            .iter()
            .any(|(_, dir)| prefix.prefix_match(dir).is_some())
    }

    /// The snapshot files of the tables at or under `prefix`, as object metadata.
    async fn snapshot(&self, prefix: Option<&Path>) -> Result<Vec<ObjectMeta>> {
        let mut objects = Vec::new();
        for (name, dir) in self.tables_under(prefix) {
            let files = self.lake.table_files(name).await.map_err(|e| {
                datafusion::object_store::Error::Generic {
                    store: "LakeStore",
                    source: Box::new(e),
                }
            })?;
            for f in files {
                let location = f.path.split('/').fold(dir.clone(), |p, part| p.join(part));
                if prefix.is_some_and(|p| location.prefix_match(p).is_none()) {
                    continue;
                }
                objects.push(ObjectMeta {
                    location,
                    last_modified: chrono::DateTime::from_timestamp_millis(f.modified_ms)
                        .unwrap_or_default(),
                    size: f.size,
                    e_tag: None,
                    version: None,
                });
            }
        }
        Ok(objects)
    }

    async fn listed(&self, prefix: Option<Path>) -> Result<Vec<ObjectMeta>> {
        let mut objects = self.snapshot(prefix.as_ref()).await?;
        if prefix.as_ref().is_none_or(|p| !self.in_a_table(p)) {
            let outside: Vec<ObjectMeta> = self.inner.list(prefix.as_ref()).try_collect().await?;
            objects.extend(
                outside
                    .into_iter()
                    .filter(|o| !self.in_a_table(&o.location)),
            );
        }
        Ok(objects)
    }
}

impl fmt::Display for LakeStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LakeStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for LakeStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let (this, prefix) = (self.clone(), prefix.cloned());
        futures::stream::once(async move { this.listed(prefix).await })
            .map_ok(|objects| futures::stream::iter(objects.into_iter().map(Ok)))
            .try_flatten()
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let Some(base) = prefix.filter(|p| self.in_a_table(p)) else {
            return self.inner.list_with_delimiter(prefix).await;
        };
        let depth = base.parts().count();
        let mut common_prefixes = Vec::new();
        let mut objects = Vec::new();
        for o in self.snapshot(Some(base)).await? {
            let parts: Vec<_> = o.location.parts().collect();
            if parts.len() == depth + 1 {
                objects.push(o);
            } else if parts.len() > depth + 1 {
                let dir: Path = parts[..=depth].iter().cloned().collect();
                if !common_prefixes.contains(&dir) {
                    common_prefixes.push(dir);
                }
            }
        }
        Ok(ListResult {
            common_prefixes,
            objects,
        })
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
