//! Registrations as received, and their validation.
//!
//! Owns: [`Registration`], the checks of each of its fields (every check is
//! made before any state changes; the error names the field and what is
//! wrong), and the limits those checks apply.
//!
//! Must not touch: registry state.

use std::sync::Arc;

use super::error::RegistryError;
use super::labels::Labels;

/// Longest executor name, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Longest address, in bytes.
pub const MAX_ADDRESS_LEN: usize = 255;
/// Longest owner identity, in bytes.
pub const MAX_OWNER_LEN: usize = 1024;

/// A registration request as received (unvalidated).
#[derive(Debug, Clone, Default)]
pub struct Registration {
    /// Prefix of the id; empty means `executor`.
    pub name: String,
    /// `host:port` where the executor serves.
    pub address: String,
    /// Labels for selectors.
    pub labels: Vec<(String, String)>,
    /// The identity registering it (see [`Caller::owner`]); None: unowned.
    /// Only this identity may heartbeat or deregister it (admins may
    /// deregister it too).
    pub owner: Option<String>,
}

/// A registration that passed validation.
#[derive(Debug, Clone)]
pub(crate) struct ValidRegistration {
    pub name: String,
    pub address: String,
    pub labels: Labels,
    pub owner: Option<Arc<str>>,
}

impl Registration {
    /// Checks every field; the error names the field and what is wrong.
    pub(crate) fn validate(self) -> Result<ValidRegistration, RegistryError> {
        check_name(&self.name)?;
        check_address(&self.address)?;
        let labels = Labels::new(self.labels)?;
        if let Some(owner) = &self.owner
            && (owner.is_empty() || owner.len() > MAX_OWNER_LEN)
        {
            return Err(RegistryError::invalid(
                "owner",
                format!(
                    "identity is {} bytes; it must be 1 to {MAX_OWNER_LEN}",
                    owner.len()
                ),
            ));
        }
        Ok(ValidRegistration {
            name: self.name,
            address: self.address,
            labels,
            owner: self.owner.map(Arc::from),
        })
    }
}

fn check_name(name: &str) -> Result<(), RegistryError> {
    if name.len() > MAX_NAME_LEN {
        return Err(RegistryError::invalid(
            "name",
            format!("is {} bytes, at most {MAX_NAME_LEN} allowed", name.len()),
        ));
    }
    if let Some(c) = name.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(RegistryError::invalid(
            "name",
            format!("contains {c:?}; only printable ASCII without spaces is allowed"),
        ));
    }
    Ok(())
}

fn check_address(address: &str) -> Result<(), RegistryError> {
    if address.is_empty() {
        return Err(RegistryError::invalid("address", "is required (host:port)"));
    }
    if address.len() > MAX_ADDRESS_LEN {
        return Err(RegistryError::invalid(
            "address",
            format!(
                "is {} bytes, at most {MAX_ADDRESS_LEN} allowed",
                address.len()
            ),
        ));
    }
    let shown = || address.chars().take(80).collect::<String>();
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(RegistryError::invalid(
            "address",
            format!("{:?} is not host:port", shown()),
        ));
    };
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty()
            && host
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c == b'_')
    };
    if !host_ok {
        return Err(RegistryError::invalid(
            "address",
            format!("{:?} has an invalid host", shown()),
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 && !port.starts_with('+') => Ok(()),
        _ => Err(RegistryError::invalid(
            "address",
            format!("{:?} has an invalid port (1-65535)", shown()),
        )),
    }
}
