//! The hub in memory: the registry, links and statuses of the embedded
//! default until the durable store lands. One lock for the whole state: the
//! calls are short map operations, made at sign-up, sign-in, publish and
//! close, never per notification.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use super::{
    AuthContext, ConnectionRef, ConnectionStatus, Connections, DeviceRecord, Hub, HubError, Online,
    Replaced, StoredLink,
};

#[derive(Debug, Default)]
struct Device {
    /// As the device first presented it.
    device_id: String,
    owner: String,
    status: ConnectionStatus,
    /// The connection that went ONLINE last, while it is open.
    connection: Option<ConnectionRef>,
    /// By normalised href.
    links: BTreeMap<String, StoredLink>,
}

impl Device {
    fn record(&self) -> DeviceRecord {
        DeviceRecord {
            device_id: self.device_id.clone(),
            owner: self.owner.clone(),
            status: self.status.clone(),
        }
    }
}

/// The in-memory [`Hub`].
#[derive(Default)]
pub struct MemoryHub {
    /// Keyed by [`key`].
    devices: Mutex<HashMap<String, Device>>,
    connections: OnceLock<Arc<dyn Connections>>,
}

impl std::fmt::Debug for MemoryHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryHub").finish_non_exhaustive()
    }
}

/// Device IDs are UUIDs (OCF `di`): `ABC…` and `abc…` are one device.
fn key(device_id: &str) -> String {
    match uuid::Uuid::parse_str(device_id) {
        Ok(id) => id.hyphenated().to_string(),
        Err(_) => device_id.to_owned(),
    }
}

impl MemoryHub {
    pub fn new() -> MemoryHub {
        MemoryHub::default()
    }

    /// How the hub reaches device connections; set once, after the
    /// transport started. Until then no connection is closed by the hub.
    pub fn set_connections(&self, connections: Arc<dyn Connections>) {
        if self.connections.set(connections).is_err() {
            tracing::warn!("hub connections set twice; keeping the first");
        }
    }

    fn state(&self) -> MutexGuard<'_, HashMap<String, Device>> {
        // A panic while holding the lock cannot leave a map half-updated in
        // a way later calls would misread (each call is one map operation),
        // so a poisoned lock is taken over rather than spreading the panic.
        self.devices
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn close(&self, connection: ConnectionRef, reason: &str) {
        if let Some(connections) = self.connections.get() {
            connections.close(connection, reason);
        }
    }
}

impl Hub for MemoryHub {
    fn add_device(&self, ctx: &AuthContext) -> Result<(), HubError> {
        let mut devices = self.state();
        let device = devices
            .entry(key(&ctx.device_id))
            .or_insert_with(|| Device {
                device_id: ctx.device_id.clone(),
                owner: ctx.owner.clone(),
                ..Device::default()
            });
        if device.owner != ctx.owner {
            return Err(HubError::PermissionDenied(format!(
                "device {} belongs to another owner",
                ctx.device_id
            )));
        }
        Ok(())
    }

    fn owns(&self, owner: &str, device_id: &str) -> bool {
        self.state()
            .get(&key(device_id))
            .is_some_and(|d| d.owner == owner)
    }

    fn delete_device(&self, owner: &str, device_id: &str) -> Result<(), HubError> {
        let removed = {
            let mut devices = self.state();
            let k = key(device_id);
            match devices.get(&k) {
                Some(d) if d.owner == owner => devices.remove(&k),
                _ => None,
            }
        };
        let Some(device) = removed else {
            return Err(HubError::NotFound(format!("device {device_id} not found")));
        };
        if let Some(connection) = device.connection {
            self.close(connection, "device deleted");
        }
        Ok(())
    }

    fn publish(&self, ctx: &AuthContext, links: Vec<StoredLink>) -> Result<(), HubError> {
        if let Some(bad) = links.iter().find(|l| l.href == "/") {
            return Err(HubError::InvalidArgument(format!(
                "invalid resource href {:?}",
                bad.href
            )));
        }
        let mut devices = self.state();
        let device = devices
            .get_mut(&key(&ctx.device_id))
            .filter(|d| d.owner == ctx.owner)
            .ok_or_else(|| {
                HubError::PermissionDenied(format!("device {} is not registered", ctx.device_id))
            })?;
        for link in links {
            device.links.insert(link.href.clone(), link);
        }
        Ok(())
    }

    fn unpublish(
        &self,
        ctx: &AuthContext,
        instance_ids: &[i64],
        now_unix: u64,
    ) -> Result<Vec<String>, HubError> {
        let mut devices = self.state();
        let device = devices
            .get_mut(&key(&ctx.device_id))
            .filter(|d| d.owner == ctx.owner)
            .ok_or_else(|| HubError::NotFound(format!("device {} not found", ctx.device_id)))?;
        // Expired links are gone already; they do not count as unpublished.
        device
            .links
            .retain(|_, l| l.valid_until.is_none_or(|t| t > now_unix));
        let removed: Vec<String> = device
            .links
            .values()
            .filter(|l| instance_ids.is_empty() || instance_ids.contains(&l.instance_id))
            .map(|l| l.href.clone())
            .collect();
        if removed.is_empty() {
            return Err(HubError::NotFound("no such resource links".into()));
        }
        for href in &removed {
            device.links.remove(href);
        }
        Ok(removed)
    }

    fn links(
        &self,
        owner: &str,
        device_ids: &[&str],
        resource_types: &[&str],
        now_unix: u64,
    ) -> Vec<(String, Vec<StoredLink>)> {
        let wanted: Vec<String> = device_ids.iter().map(|d| key(d)).collect();
        let devices = self.state();
        let mut out: Vec<(String, Vec<StoredLink>)> = devices
            .iter()
            .filter(|(k, d)| d.owner == owner && (wanted.is_empty() || wanted.contains(k)))
            .map(|(_, d)| {
                let links = d
                    .links
                    .values()
                    .filter(|l| l.valid_until.is_none_or(|t| t > now_unix))
                    .filter(|l| {
                        resource_types.is_empty()
                            || resource_types.iter().any(|rt| l.has_resource_type(rt))
                    })
                    .cloned()
                    .collect::<Vec<_>>();
                (d.device_id.clone(), links)
            })
            .filter(|(_, links)| !links.is_empty())
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn set_online(&self, ctx: &AuthContext, online: Online) -> Result<Replaced, HubError> {
        let replaced = {
            let mut devices = self.state();
            // Only a registered device goes online: a device deleted
            // between the ownership check and here stays deleted.
            let device = devices
                .get_mut(&key(&ctx.device_id))
                .filter(|d| d.owner == ctx.owner)
                .ok_or_else(|| {
                    HubError::NotFound(format!("device {} is not registered", ctx.device_id))
                })?;
            let previous = device
                .connection
                .replace(online.connection)
                .filter(|c| *c != online.connection);
            device.status = ConnectionStatus {
                online: true,
                connected_at_ns: online.connected_at_ns,
                protocol: Some(online.protocol),
                service_id: online.service_id,
                connection_id: online.connection_id,
                local_endpoints: Vec::new(),
            };
            previous
        };
        // spec §14 item 13: one connection per device; the newer wins.
        if let Some(older) = replaced {
            self.close(older, "the device signed in on another connection");
        }
        Ok(Replaced(replaced))
    }

    fn set_local_endpoints(&self, device_id: &str, connection: ConnectionRef, eps: Vec<String>) {
        let mut devices = self.state();
        if let Some(device) = devices.get_mut(&key(device_id)) {
            if device.connection == Some(connection) {
                device.status.local_endpoints = eps;
            }
        }
    }

    fn set_offline(&self, device_id: &str, connection: ConnectionRef) {
        let mut devices = self.state();
        if let Some(device) = devices.get_mut(&key(device_id)) {
            if device.connection == Some(connection) {
                device.connection = None;
                device.status.online = false;
            }
        }
    }

    fn device(&self, owner: &str, device_id: &str) -> Option<DeviceRecord> {
        self.state()
            .get(&key(device_id))
            .filter(|d| d.owner == owner)
            .map(Device::record)
    }

    fn devices(&self, owner: &str) -> Vec<DeviceRecord> {
        let mut out: Vec<DeviceRecord> = self
            .state()
            .values()
            .filter(|d| d.owner == owner)
            .map(Device::record)
            .collect();
        out.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Protocol;

    const D: &str = "5bbc55bb-686f-4068-6c2d-75c4a8b4f49a";

    fn ctx(owner: &str) -> AuthContext {
        AuthContext {
            owner: owner.into(),
            device_id: D.into(),
            ..AuthContext::default()
        }
    }

    fn online(c: u128) -> Online {
        Online {
            connection: ConnectionRef(c),
            connected_at_ns: 1,
            protocol: Protocol::CoapsTcp,
            service_id: "s".into(),
            connection_id: "127.0.0.1:1".into(),
        }
    }

    fn link(href: &str, rt: &str) -> StoredLink {
        StoredLink {
            href: href.into(),
            device_id: D.into(),
            instance_id: crate::ocf::rd::instance_id(href),
            resource_types: Some(vec![rt.into()]),
            ..StoredLink::default()
        }
    }

    #[derive(Default)]
    struct Closed(Mutex<Vec<(ConnectionRef, String)>>);
    impl Connections for Closed {
        fn close(&self, c: ConnectionRef, reason: &str) {
            self.0.lock().unwrap().push((c, reason.into()));
        }
    }

    #[test]
    fn a_device_has_one_owner() {
        let hub = MemoryHub::new();
        hub.add_device(&ctx("alice")).unwrap();
        hub.add_device(&ctx("alice")).unwrap();
        assert!(matches!(
            hub.add_device(&ctx("bob")),
            Err(HubError::PermissionDenied(_))
        ));
        assert!(hub.owns("alice", &D.to_uppercase()));
        assert!(!hub.owns("bob", D));
    }

    #[test]
    fn unpublish_by_instance_and_all() {
        let hub = MemoryHub::new();
        let c = ctx("alice");
        hub.add_device(&c).unwrap();
        hub.publish(&c, vec![link("/a", "x"), link("/b", "y")])
            .unwrap();
        assert_eq!(hub.links("alice", &[], &["y"], 0)[0].1.len(), 1);
        assert!(hub.unpublish(&c, &[999], 0).is_err());
        let ins = crate::ocf::rd::instance_id("/a");
        assert_eq!(hub.unpublish(&c, &[ins], 0).unwrap(), vec!["/a"]);
        assert_eq!(hub.unpublish(&c, &[], 0).unwrap(), vec!["/b"]);
        assert!(hub.unpublish(&c, &[], 0).is_err());
        assert!(hub.links("alice", &[], &[], 0).is_empty());
    }

    #[test]
    fn root_href_is_refused() {
        let hub = MemoryHub::new();
        let c = ctx("alice");
        hub.add_device(&c).unwrap();
        assert!(matches!(
            hub.publish(&c, vec![link("/", "x")]),
            Err(HubError::InvalidArgument(_))
        ));
    }

    #[test]
    fn offline_from_an_older_connection_is_ignored_and_delete_closes() {
        let hub = MemoryHub::new();
        let closed = Arc::new(Closed::default());
        hub.set_connections(closed.clone());
        let c = ctx("alice");
        hub.add_device(&c).unwrap();
        assert!(hub.set_online(&ctx("bob"), online(1)).is_err());
        assert_eq!(hub.set_online(&c, online(1)), Ok(Replaced(None)));
        assert_eq!(
            hub.set_online(&c, online(2)),
            Ok(Replaced(Some(ConnectionRef(1))))
        );
        hub.set_offline(D, ConnectionRef(1));
        assert!(hub.device("alice", D).unwrap().status.online);
        assert!(hub.device("bob", D).is_none());
        hub.delete_device("alice", D).unwrap();
        assert_eq!(
            closed.0.lock().unwrap().as_slice(),
            &[
                (
                    ConnectionRef(1),
                    "the device signed in on another connection".to_string()
                ),
                (ConnectionRef(2), "device deleted".to_string())
            ]
        );
        assert!(hub.devices("alice").is_empty());
        assert!(hub.delete_device("alice", D).is_err());
    }
}
