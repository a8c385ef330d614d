//! git sources through the worker against a bare repository made by the test and served over
//! `file://`. Needs root (overlay mounts to read results) and git.

mod worker_ops_support;

use std::sync::Arc;

use anyhow::Result;
use integration::git;
use worker::ErrorKind;
use worker_ops_support::*;

/// A bare repo with `main` (2 commits), an annotated tag `v1` on the first commit.
struct Repo {
    _dir: tempfile::TempDir,
    work: std::path::PathBuf,
    url: String,
    first: String,
}

fn make_repo() -> Result<Repo> {
    integration::require_tool("git", "git");
    let dir = tempfile::tempdir()?;
    let bare = dir.path().join("repo.git");
    let work = dir.path().join("work");
    std::fs::create_dir(&work)?;
    git(
        dir.path(),
        &["init", "--quiet", "--bare", "-b", "main", "repo.git"],
    )?;
    git(&work, &["init", "--quiet", "-b", "main"])?;
    std::fs::write(work.join("a.txt"), "v1\n")?;
    std::fs::create_dir(work.join("sub"))?;
    std::fs::write(work.join("sub/b.txt"), "in sub\n")?;
    git(&work, &["add", "."])?;
    git(&work, &["commit", "--quiet", "-m", "one"])?;
    let first = git(&work, &["rev-parse", "HEAD"])?;
    git(&work, &["tag", "-a", "v1", "-m", "tag v1"])?;
    std::fs::write(work.join("a.txt"), "v2\n")?;
    git(&work, &["commit", "--quiet", "-am", "two"])?;
    git(
        &work,
        &["push", "--quiet", bare.to_str().unwrap(), "main", "v1"],
    )?;
    Ok(Repo {
        url: format!("file://{}", bare.display()),
        work,
        _dir: dir,
        first,
    })
}

async fn solve_git(w: &TestWorker, repo: &Repo, fragment: &str, extra: &[(&str, &str)]) -> Solve {
    let mut attrs = vec![("git.fullurl", repo.url.as_str())];
    attrs.extend_from_slice(extra);
    solve_def(
        &w.worker,
        source_def(&format!("git://local/repo.git{fragment}"), &attrs),
        Arc::new(TestSession::default()),
        CancellationToken::new(),
    )
    .await
}

/// Branch, tag, commit, subdir, keep-git-dir; no .git by default.
#[tokio::test]
async fn git_refs_subdir_keepgitdir() -> Result<()> {
    let w = TestWorker::new()?;
    let repo = make_repo()?;

    let s = solve_git(&w, &repo, "#main", &[]).await;
    let r = s.ok();
    assert_eq!(read(r, "/a.txt").await?.as_deref(), Some("v2\n"));
    assert_eq!(read(r, "/sub/b.txt").await?.as_deref(), Some("in sub\n"));
    let m = r.mount().await?;
    assert!(!m.path().join(".git").exists());
    drop(m);

    let s = solve_git(&w, &repo, "#v1", &[]).await;
    assert_eq!(read(s.ok(), "/a.txt").await?.as_deref(), Some("v1\n"));
    let s = solve_git(&w, &repo, &format!("#{}", repo.first), &[]).await;
    assert_eq!(read(s.ok(), "/a.txt").await?.as_deref(), Some("v1\n"));
    // Default branch.
    let s = solve_git(&w, &repo, "", &[]).await;
    assert_eq!(read(s.ok(), "/a.txt").await?.as_deref(), Some("v2\n"));

    let s = solve_git(&w, &repo, "#main:sub", &[]).await;
    let r = s.ok();
    assert_eq!(read(r, "/b.txt").await?.as_deref(), Some("in sub\n"));
    assert_eq!(read(r, "/a.txt").await?, None);

    let s = solve_git(&w, &repo, "#v1", &[("git.keepgitdir", "true")]).await;
    let m = s.ok().mount().await?;
    let head = git(m.path(), &["rev-parse", "HEAD"])?;
    assert_eq!(head, repo.first);
    let status = git(m.path(), &["status", "--porcelain"])?;
    assert_eq!(status, "", "checkout not clean");
    Ok(())
}

/// Rebuild of an unchanged ref is cached; a moved branch is fetched again; unknown refs and
/// subdirs fail clearly.
#[tokio::test]
async fn git_cache_and_errors() -> Result<()> {
    let w = TestWorker::new()?;
    let repo = make_repo()?;
    let s = solve_git(&w, &repo, "#main", &[]).await;
    s.ok();
    let again = solve_git(&w, &repo, "#main", &[]).await;
    again.ok();
    assert!(again.completed().iter().all(|(_, c)| *c));

    std::fs::write(repo.work.join("a.txt"), "v3\n")?;
    git(&repo.work, &["commit", "--quiet", "-am", "three"])?;
    let bare = repo.url.trim_start_matches("file://").to_string();
    git(&repo.work, &["push", "--quiet", &bare, "main"])?;
    let s = solve_git(&w, &repo, "#main", &[]).await;
    assert_eq!(read(s.ok(), "/a.txt").await?.as_deref(), Some("v3\n"));
    assert!(s.completed().iter().all(|(_, c)| !*c));

    let s = solve_git(&w, &repo, "#nope", &[]).await;
    let err = s.result.expect_err("unknown ref");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("does not contain ref"), "{err}");

    let s = solve_git(&w, &repo, "#main:missing", &[]).await;
    let err = s.result.expect_err("missing subdir");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");

    let s = solve_def(
        &w.worker,
        source_def(
            "git://local/none.git#main",
            &[("git.fullurl", "file:///nonexistent/none.git")],
        ),
        Arc::new(TestSession::default()),
        CancellationToken::new(),
    )
    .await;
    let err = s.result.expect_err("no repo");
    assert!(err.to_string().contains("ls-remote"), "{err}");
    Ok(())
}
