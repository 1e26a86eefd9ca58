//! Resolve `--model`: a directory, or `ORG/NAME` in the local Hugging Face cache.
//!
//! Never touches the network. The cache root is `$HF_HUB_CACHE`, else
//! `$HF_HOME/hub`, else `~/.cache/huggingface/hub`; a repo lives in
//! `models--ORG--NAME/snapshots/<commit in refs/main>/`.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The Hugging Face hub cache folder from the environment.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

/// The model directory for `spec`: itself when it is a directory, else the
/// cached snapshot of the repo `ORG/NAME`.
pub fn resolve_model_dir(spec: &str) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    let looks_like_repo = spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.ends_with('/');
    if !looks_like_repo {
        return Err(Error::NotFound {
            path: p.to_path_buf(),
            what: "no such model directory (give a directory or a Hugging Face repo id ORG/NAME)".into(),
        });
    }
    resolve_in_cache(spec, &hub_cache_dir())
}

/// Look `repo` (`ORG/NAME`) up in the cache rooted at `cache`.
pub fn resolve_in_cache(repo: &str, cache: &Path) -> Result<PathBuf> {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let not_found = || Error::NotInCache { repo: repo.to_string(), searched: repo_dir.clone() };
    let snapshots = repo_dir.join("snapshots");
    if let Ok(commit) = std::fs::read_to_string(repo_dir.join("refs").join("main")) {
        let snap = snapshots.join(commit.trim());
        if snap.is_dir() {
            return Ok(snap);
        }
    }
    // No usable refs/main: accept a single snapshot.
    let mut snaps: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .map_err(|_| not_found())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    if snaps.len() == 1 {
        return Ok(snaps.remove(0));
    }
    Err(not_found())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_snapshot_through_refs_main() {
        let root = tempfile::tempdir().unwrap();
        let repo = root.path().join("models--state-spaces--mamba-130m-hf");
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/old999")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        let got = resolve_in_cache("state-spaces/mamba-130m-hf", root.path()).unwrap();
        assert_eq!(got, repo.join("snapshots/abc123"));
    }

    #[test]
    fn missing_repo_says_how_to_download() {
        let root = tempfile::tempdir().unwrap();
        let err = resolve_in_cache("state-spaces/mamba-2.8b-hf", root.path()).unwrap_err().to_string();
        assert!(err.contains("huggingface-cli download state-spaces/mamba-2.8b-hf"), "{err}");
    }

    #[test]
    fn non_repo_path_is_not_found() {
        let err = resolve_model_dir("./no/such/dir/here").unwrap_err().to_string();
        assert!(err.contains("no such model directory"), "{err}");
    }
}
