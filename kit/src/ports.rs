//! Free TCP ports on the loopback interface, for servers the tools and tests start.

use anyhow::{Context, Result};

/// A port that was free a moment ago. Racy by nature: callers retry when the bind fails.
pub fn free_port() -> Result<u16> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0 to find a port")?;
    Ok(probe.local_addr()?.port())
}
