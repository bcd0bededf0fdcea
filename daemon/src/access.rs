//! Who may call: the optional allow-list of uids and gids (`allow_uids`,
//! `allow_gids`), checked against the caller's peer credentials on every
//! call to every service on the socket.

use std::sync::Arc;

use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};
use tracing::warn;

/// The callers admitted; an empty list admits anyone who can open the socket.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    uids: Arc<[u32]>,
    gids: Arc<[u32]>,
}

impl AllowList {
    pub fn new(uids: &[u32], gids: &[u32]) -> Self {
        AllowList {
            uids: uids.into(),
            gids: gids.into(),
        }
    }

    /// Whether anyone who can open the socket is admitted.
    pub fn is_open(&self) -> bool {
        self.uids.is_empty() && self.gids.is_empty()
    }

    pub fn admits(&self, uid: u32, gid: u32) -> bool {
        self.is_open() || self.uids.contains(&uid) || self.gids.contains(&gid)
    }

    /// PERMISSION_DENIED unless the caller behind `request` is admitted.
    pub fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if self.is_open() {
            return Ok(());
        }
        let cred = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred);
        let Some(cred) = cred else {
            warn!("call refused: the caller's credentials are unknown");
            return Err(Status::permission_denied(
                "the caller's credentials are unknown, and this daemon admits only the uids in allow_uids and the gids in allow_gids",
            ));
        };
        if self.admits(cred.uid(), cred.gid()) {
            return Ok(());
        }
        warn!(
            uid = cred.uid(),
            gid = cred.gid(),
            pid = cred.pid().unwrap_or(0),
            "call refused: not in allow_uids or allow_gids"
        );
        Err(Status::permission_denied(format!(
            "uid {} (gid {}) may not use this daemon: it admits only the uids in allow_uids and the gids in allow_gids",
            cred.uid(),
            cred.gid()
        )))
    }
}

/// As an interceptor, for `tonic::service::InterceptorLayer`.
impl tonic::service::Interceptor for AllowList {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(&request)?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn either_list_admits_and_empty_lists_admit_all() {
        let open = AllowList::default();
        assert!(open.is_open() && open.admits(1234, 1234));
        let list = AllowList::new(&[1000], &[50]);
        assert!(list.admits(1000, 1));
        assert!(list.admits(1, 50));
        assert!(!list.admits(1001, 1001));
        // No credentials, no call.
        let status = list.check(&Request::new(())).unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(open.check(&Request::new(())).is_ok());
    }
}
