//! OpenNebula's numeric states as named enums (opennebula-api.md §1.7 and §2.5): the one
//! set of state enums, used by the clients, the observation and the planner
//! ([`crate::plan::LiveVm`] holds these types, never a bare number).
//! Every enum keeps numbers it does not know as `Other(n)` (`Unknown` is a real LCM state).
//! Serialized (observation digests, debug dumps) as OpenNebula's name, or the number for
//! `Other`; either form reads back (tests below).

macro_rules! numbered_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $var:ident = $val:literal => $text:literal),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $var,)*
            /// A number this crate does not know.
            Other(i64),
        }

        impl $name {
            /// The enum for OpenNebula's number.
            pub fn from_code(n: i64) -> Self {
                match n {
                    $($val => Self::$var,)*
                    other => Self::Other(other),
                }
            }

            /// OpenNebula's number.
            pub fn code(self) -> i64 {
                match self {
                    $(Self::$var => $val,)*
                    Self::Other(n) => n,
                }
            }

            /// OpenNebula's name (`None` for `Other`).
            pub fn name(self) -> Option<&'static str> {
                match self {
                    $(Self::$var => Some($text),)*
                    Self::Other(_) => None,
                }
            }

            /// Every named value, in numeric order.
            pub const ALL: &'static [$name] = &[$(Self::$var,)*];
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, "UNKNOWN({})", self.code()),
                }
            }
        }

        impl From<i64> for $name {
            fn from(n: i64) -> Self {
                Self::from_code(n)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                match self.name() {
                    Some(n) => s.serialize_str(n),
                    None => s.serialize_i64(self.code()),
                }
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                #[derive(serde::Deserialize)]
                #[serde(untagged)]
                enum Repr {
                    Code(i64),
                    Name(String),
                }
                match Repr::deserialize(d)? {
                    Repr::Code(n) => Ok(Self::from_code(n)),
                    Repr::Name(n) => Self::ALL
                        .iter()
                        .copied()
                        .find(|v| v.name() == Some(n.as_str()))
                        .ok_or_else(|| serde::de::Error::custom(format!(
                            "unknown {} {n:?}",
                            stringify!($name)
                        ))),
                }
            }
        }
    };
}

/// Defaults: the state of a fresh object. The enums come from a macro that cannot mark a
/// `#[default]` variant.
macro_rules! default_state {
    ($($name:ident => $var:ident),* $(,)?) => {
        $(
            #[allow(clippy::derivable_impls)]
            impl Default for $name {
                fn default() -> Self {
                    Self::$var
                }
            }
        )*
    };
}

default_state! {
    VmState => Init,
    LcmState => LcmInit,
    ServiceState => Pending,
    RoleState => Pending,
}

numbered_enum! {
    /// VM `STATE`.
    VmState {
        Init = 0 => "INIT",
        Pending = 1 => "PENDING",
        Hold = 2 => "HOLD",
        Active = 3 => "ACTIVE",
        Stopped = 4 => "STOPPED",
        Suspended = 5 => "SUSPENDED",
        Done = 6 => "DONE",
        /// Obsolete, reserved.
        Failed = 7 => "FAILED",
        Poweroff = 8 => "POWEROFF",
        Undeployed = 9 => "UNDEPLOYED",
        Cloning = 10 => "CLONING",
        CloningFailure = 11 => "CLONING_FAILURE",
    }
}

numbered_enum! {
    /// VM `LCM_STATE` (meaningful while `STATE` is ACTIVE).
    LcmState {
        LcmInit = 0 => "LCM_INIT",
        Prolog = 1 => "PROLOG",
        Boot = 2 => "BOOT",
        Running = 3 => "RUNNING",
        Migrate = 4 => "MIGRATE",
        SaveStop = 5 => "SAVE_STOP",
        SaveSuspend = 6 => "SAVE_SUSPEND",
        SaveMigrate = 7 => "SAVE_MIGRATE",
        PrologMigrate = 8 => "PROLOG_MIGRATE",
        PrologResume = 9 => "PROLOG_RESUME",
        EpilogStop = 10 => "EPILOG_STOP",
        Epilog = 11 => "EPILOG",
        Shutdown = 12 => "SHUTDOWN",
        /// Obsolete.
        Cancel = 13 => "CANCEL",
        /// Obsolete.
        Failure = 14 => "FAILURE",
        CleanupResubmit = 15 => "CLEANUP_RESUBMIT",
        Unknown = 16 => "UNKNOWN",
        Hotplug = 17 => "HOTPLUG",
        ShutdownPoweroff = 18 => "SHUTDOWN_POWEROFF",
        BootUnknown = 19 => "BOOT_UNKNOWN",
        BootPoweroff = 20 => "BOOT_POWEROFF",
        BootSuspended = 21 => "BOOT_SUSPENDED",
        BootStopped = 22 => "BOOT_STOPPED",
        CleanupDelete = 23 => "CLEANUP_DELETE",
        HotplugSnapshot = 24 => "HOTPLUG_SNAPSHOT",
        HotplugNic = 25 => "HOTPLUG_NIC",
        HotplugSaveas = 26 => "HOTPLUG_SAVEAS",
        HotplugSaveasPoweroff = 27 => "HOTPLUG_SAVEAS_POWEROFF",
        HotplugSaveasSuspended = 28 => "HOTPLUG_SAVEAS_SUSPENDED",
        ShutdownUndeploy = 29 => "SHUTDOWN_UNDEPLOY",
        EpilogUndeploy = 30 => "EPILOG_UNDEPLOY",
        PrologUndeploy = 31 => "PROLOG_UNDEPLOY",
        BootUndeploy = 32 => "BOOT_UNDEPLOY",
        HotplugPrologPoweroff = 33 => "HOTPLUG_PROLOG_POWEROFF",
        HotplugEpilogPoweroff = 34 => "HOTPLUG_EPILOG_POWEROFF",
        BootMigrate = 35 => "BOOT_MIGRATE",
        BootFailure = 36 => "BOOT_FAILURE",
        BootMigrateFailure = 37 => "BOOT_MIGRATE_FAILURE",
        PrologMigrateFailure = 38 => "PROLOG_MIGRATE_FAILURE",
        PrologFailure = 39 => "PROLOG_FAILURE",
        EpilogFailure = 40 => "EPILOG_FAILURE",
        EpilogStopFailure = 41 => "EPILOG_STOP_FAILURE",
        EpilogUndeployFailure = 42 => "EPILOG_UNDEPLOY_FAILURE",
        PrologMigratePoweroff = 43 => "PROLOG_MIGRATE_POWEROFF",
        PrologMigratePoweroffFailure = 44 => "PROLOG_MIGRATE_POWEROFF_FAILURE",
        PrologMigrateSuspend = 45 => "PROLOG_MIGRATE_SUSPEND",
        PrologMigrateSuspendFailure = 46 => "PROLOG_MIGRATE_SUSPEND_FAILURE",
        BootUndeployFailure = 47 => "BOOT_UNDEPLOY_FAILURE",
        BootStoppedFailure = 48 => "BOOT_STOPPED_FAILURE",
        PrologResumeFailure = 49 => "PROLOG_RESUME_FAILURE",
        PrologUndeployFailure = 50 => "PROLOG_UNDEPLOY_FAILURE",
        DiskSnapshotPoweroff = 51 => "DISK_SNAPSHOT_POWEROFF",
        DiskSnapshotRevertPoweroff = 52 => "DISK_SNAPSHOT_REVERT_POWEROFF",
        DiskSnapshotDeletePoweroff = 53 => "DISK_SNAPSHOT_DELETE_POWEROFF",
        DiskSnapshotSuspended = 54 => "DISK_SNAPSHOT_SUSPENDED",
        /// Obsolete.
        DiskSnapshotRevertSuspended = 55 => "DISK_SNAPSHOT_REVERT_SUSPENDED",
        DiskSnapshotDeleteSuspended = 56 => "DISK_SNAPSHOT_DELETE_SUSPENDED",
        DiskSnapshot = 57 => "DISK_SNAPSHOT",
        /// Obsolete.
        DiskSnapshotRevert = 58 => "DISK_SNAPSHOT_REVERT",
        DiskSnapshotDelete = 59 => "DISK_SNAPSHOT_DELETE",
        PrologMigrateUnknown = 60 => "PROLOG_MIGRATE_UNKNOWN",
        PrologMigrateUnknownFailure = 61 => "PROLOG_MIGRATE_UNKNOWN_FAILURE",
        DiskResize = 62 => "DISK_RESIZE",
        DiskResizePoweroff = 63 => "DISK_RESIZE_POWEROFF",
        DiskResizeUndeployed = 64 => "DISK_RESIZE_UNDEPLOYED",
        HotplugNicPoweroff = 65 => "HOTPLUG_NIC_POWEROFF",
        HotplugResize = 66 => "HOTPLUG_RESIZE",
        HotplugSaveasUndeployed = 67 => "HOTPLUG_SAVEAS_UNDEPLOYED",
        HotplugSaveasStopped = 68 => "HOTPLUG_SAVEAS_STOPPED",
        Backup = 69 => "BACKUP",
        BackupPoweroff = 70 => "BACKUP_POWEROFF",
        Restore = 71 => "RESTORE",
    }
}

impl LcmState {
    /// One of the 14 `*_FAILURE` states OneFlow treats as a failed deployment.
    pub fn is_failure(self) -> bool {
        matches!(self.code(), 36..=42 | 44 | 46..=50 | 61)
    }
}

numbered_enum! {
    /// OneFlow service `state` (6.10 / 7.x: 0–15).
    ServiceState {
        Pending = 0 => "PENDING",
        Deploying = 1 => "DEPLOYING",
        Running = 2 => "RUNNING",
        Undeploying = 3 => "UNDEPLOYING",
        Warning = 4 => "WARNING",
        Done = 5 => "DONE",
        FailedUndeploying = 6 => "FAILED_UNDEPLOYING",
        FailedDeploying = 7 => "FAILED_DEPLOYING",
        Scaling = 8 => "SCALING",
        FailedScaling = 9 => "FAILED_SCALING",
        Cooldown = 10 => "COOLDOWN",
        DeployingNets = 11 => "DEPLOYING_NETS",
        UndeployingNets = 12 => "UNDEPLOYING_NETS",
        FailedDeployingNets = 13 => "FAILED_DEPLOYING_NETS",
        FailedUndeployingNets = 14 => "FAILED_UNDEPLOYING_NETS",
        /// Service HOLD is 15 (role HOLD is 11).
        Hold = 15 => "HOLD",
    }
}

impl ServiceState {
    /// Going away: undeploying or done.
    pub fn is_going_away(self) -> bool {
        matches!(
            self,
            Self::Undeploying
                | Self::UndeployingNets
                | Self::Done
                | Self::FailedUndeploying
                | Self::FailedUndeployingNets
        )
    }

    /// Deploying, including the network phase and the initial pending state.
    pub fn is_deploying(self) -> bool {
        matches!(self, Self::Pending | Self::Deploying | Self::DeployingNets)
    }

    /// States OneFlow leaves on its own.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Self::Deploying
                | Self::Undeploying
                | Self::Scaling
                | Self::Cooldown
                | Self::DeployingNets
                | Self::UndeployingNets
        )
    }

    /// A `FAILED_*` state (needs `recover`).
    pub fn is_failed(self) -> bool {
        matches!(self.code(), 6 | 7 | 9 | 13 | 14)
    }
}

numbered_enum! {
    /// OneFlow role `state` (0–11).
    RoleState {
        Pending = 0 => "PENDING",
        Deploying = 1 => "DEPLOYING",
        Running = 2 => "RUNNING",
        Undeploying = 3 => "UNDEPLOYING",
        Warning = 4 => "WARNING",
        Done = 5 => "DONE",
        FailedUndeploying = 6 => "FAILED_UNDEPLOYING",
        FailedDeploying = 7 => "FAILED_DEPLOYING",
        Scaling = 8 => "SCALING",
        FailedScaling = 9 => "FAILED_SCALING",
        Cooldown = 10 => "COOLDOWN",
        /// Role HOLD is 11 (service HOLD is 15).
        Hold = 11 => "HOLD",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_lcm_state_round_trips() {
        assert_eq!(LcmState::ALL.len(), 72);
        for (i, s) in LcmState::ALL.iter().enumerate() {
            assert_eq!(s.code(), i as i64);
            assert_eq!(LcmState::from_code(i as i64), *s);
        }
        assert_eq!(LcmState::from_code(99), LcmState::Other(99));
        assert_eq!(LcmState::Other(99).to_string(), "UNKNOWN(99)");
        assert_eq!(LcmState::Unknown.to_string(), "UNKNOWN");
    }

    #[test]
    fn failure_set_is_onflows_fourteen() {
        let n = LcmState::ALL.iter().filter(|s| s.is_failure()).count();
        assert_eq!(n, 14);
        assert!(LcmState::ALL
            .iter()
            .filter(|s| s.is_failure())
            .all(|s| s.name().is_some_and(|n| n.ends_with("_FAILURE"))));
    }

    #[test]
    fn states_serialize_by_name_and_read_back_from_name_or_number() {
        let s = serde_json::to_string(&[LcmState::BootFailure, LcmState::Other(99)]).unwrap();
        assert_eq!(s, r#"["BOOT_FAILURE",99]"#);
        let back: Vec<LcmState> = serde_json::from_str(r#"["BOOT_FAILURE",99,3]"#).unwrap();
        assert_eq!(
            back,
            [
                LcmState::BootFailure,
                LcmState::Other(99),
                LcmState::Running
            ]
        );
        assert!(serde_json::from_str::<VmState>(r#""NOPE""#).is_err());
        assert_eq!(ServiceState::default(), ServiceState::Pending);
        assert!(ServiceState::FailedUndeploying.is_going_away());
        assert!(ServiceState::DeployingNets.is_deploying());
    }

    #[test]
    fn hold_differs_between_service_and_role() {
        assert_eq!(ServiceState::from_code(15), ServiceState::Hold);
        assert_eq!(RoleState::from_code(11), RoleState::Hold);
        assert_eq!(ServiceState::from_code(11), ServiceState::DeployingNets);
        assert_eq!(VmState::ALL.len(), 12);
        assert_eq!(ServiceState::ALL.len(), 16);
        assert_eq!(RoleState::ALL.len(), 12);
    }
}
