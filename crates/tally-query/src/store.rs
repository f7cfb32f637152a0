//! The lake as the query engine lists it: the files that are part of the lake, and only
//! those.
//!
//! Two kinds of file sit in the lake's directories without being part of it, and a plain
//! directory listing would count both:
//!
//! - an events file superseded by a compacted file of the same partition and directory
//!   whose sequence range holds its own (it stays on disk for a while after the merge, for
//!   queries planned before; [`tally_store::visible`] decides);
//! - a rollup whose events file is not (yet, or any more) part of the lake: one written a
//!   moment before its events file, an orphan of a crash, the rollup of a superseded file.
//!
//! [`LakeStore`] is the local filesystem with those files left out of every listing, so a
//! query sees each event once, whatever compaction and ingest do meanwhile. For the rollups
//! it lists the events files first: a rollup is renamed into place before its events file,
//! so any events file that listing shows has its rollup on disk when the rollups are listed
//! next, and a rollup is kept exactly when its events file was shown.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::object_store::local::LocalFileSystem;
use datafusion::object_store::path::Path;
use datafusion::object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use tally_store::{parse_name, visible};

/// The local filesystem, listing the lake rooted at `root` as its readers must see it.
#[derive(Debug, Clone)]
pub(crate) struct LakeStore {
    inner: Arc<LocalFileSystem>,
    events: Path,
    rollups: Path,
}

/// Where a listed file lies: `<table>/<directory>/<name>`.
enum Place {
    Events(String),
    Rollups(String),
    Elsewhere,
}

impl LakeStore {
    pub(crate) fn new(root: &std::path::Path) -> std::io::Result<LakeStore> {
        let root = std::path::absolute(root)?;
        let table =
            |name: &str| Path::from_absolute_path(root.join(name)).map_err(std::io::Error::other);
        Ok(LakeStore {
            inner: Arc::new(LocalFileSystem::new()),
            events: table(tally_core::schema::EVENTS_TABLE)?,
            rollups: table(tally_store::ROLLUPS_TABLE)?,
        })
    }

    fn place(&self, location: &Path) -> Place {
        let relative = |table: &Path| {
            let parts: Vec<String> = location
                .prefix_match(table)?
                .map(|p| p.as_ref().to_owned())
                .collect();
            Some(parts.join("/"))
        };
        if let Some(r) = relative(&self.events) {
            Place::Events(r)
        } else if let Some(r) = relative(&self.rollups) {
            Place::Rollups(r)
        } else {
            Place::Elsewhere
        }
    }

    /// The events prefix whose listing decides the rollups a listing of `prefix` may
    /// include, if it may include any.
    fn events_scope(&self, prefix: Option<&Path>) -> Option<Path> {
        let Some(prefix) = prefix else {
            return Some(self.events.clone());
        };
        if let Some(parts) = prefix.prefix_match(&self.rollups) {
            return Some(parts.fold(self.events.clone(), |p, part| p.join(part)));
        }
        // A prefix above the rollups directory.
        self.rollups
            .prefix_match(prefix)
            .map(|_| self.events.clone())
    }

    /// The relative names (`<directory>/<name>`) of the events files among `objects` that
    /// are part of the lake.
    fn visible_events(&self, objects: &[ObjectMeta]) -> HashSet<String> {
        let files: Vec<(String, (String, u16, u64, u64))> = objects
            .iter()
            .filter_map(|o| {
                let Place::Events(relative) = self.place(&o.location) else {
                    return None;
                };
                let (dir, name) = relative.rsplit_once('/')?;
                let (partition, first, last) = parse_name(name)?;
                Some((relative.clone(), (dir.to_owned(), partition, first, last)))
            })
            .collect();
        let keys: Vec<_> = files.iter().map(|f| f.1.clone()).collect();
        files
            .into_iter()
            .zip(visible(&keys))
            .filter_map(|(f, shown)| shown.then_some(f.0))
            .collect()
    }

    /// Leaves out of `objects` what is not part of the lake. `shown` is the visible events
    /// files of a listing taken before `objects` was, for the rollups among them.
    fn keep(&self, objects: Vec<ObjectMeta>, shown: Option<&HashSet<String>>) -> Vec<ObjectMeta> {
        let events = self.visible_events(&objects);
        objects
            .into_iter()
            .filter(|o| match self.place(&o.location) {
                Place::Events(r) => events.contains(&r) || !lake_file(&r),
                Place::Rollups(r) => shown.is_some_and(|s| s.contains(&r)) || !lake_file(&r),
                Place::Elsewhere => true,
            })
            .collect()
    }

    async fn shown_before(&self, prefix: Option<&Path>) -> Result<Option<HashSet<String>>> {
        let Some(scope) = self.events_scope(prefix) else {
            return Ok(None);
        };
        let events: Vec<ObjectMeta> = self.inner.list(Some(&scope)).try_collect().await?;
        Ok(Some(self.visible_events(&events)))
    }

    async fn listed(&self, prefix: Option<Path>) -> Result<Vec<ObjectMeta>> {
        let shown = self.shown_before(prefix.as_ref()).await?;
        let objects: Vec<ObjectMeta> = self.inner.list(prefix.as_ref()).try_collect().await?;
        Ok(self.keep(objects, shown.as_ref()))
    }
}

/// Whether a relative name is a lake file's (`<directory>/p…-…-….parquet`).
fn lake_file(relative: &str) -> bool {
    relative
        .rsplit_once('/')
        .and_then(|(_, name)| parse_name(name))
        .is_some()
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
        let shown = self.shown_before(prefix).await?;
        let listed = self.inner.list_with_delimiter(prefix).await?;
        Ok(ListResult {
            common_prefixes: listed.common_prefixes,
            objects: self.keep(listed.objects, shown.as_ref()),
        })
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
