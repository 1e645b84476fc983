//! Joining several local futures (used to run split chunks concurrently).

use super::LocalBoxFuture;
use std::future::Future;
use std::task::Poll;

/// Runs all futures concurrently; returns the first error (after all have finished,
/// so that no buffer is released while an operation still uses it).
pub async fn try_join_all<'a, E: 'a>(
    futs: Vec<LocalBoxFuture<'a, Result<(), E>>>,
) -> Result<(), E> {
    let mut futs: Vec<Option<LocalBoxFuture<'a, Result<(), E>>>> =
        futs.into_iter().map(Some).collect();
    let mut first_err = None;
    std::future::poll_fn(move |cx| {
        let mut pending = false;
        for slot in futs.iter_mut() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    Poll::Ready(r) => {
                        *slot = None;
                        if let Err(e) = r {
                            first_err.get_or_insert(e);
                        }
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(first_err.take().map_or(Ok(()), Err))
        }
    })
    .await
}

/// Keeps `Future` in scope for callers building boxed futures.
pub fn boxed<'a, T>(f: impl Future<Output = T> + 'a) -> LocalBoxFuture<'a, T> {
    Box::pin(f)
}
