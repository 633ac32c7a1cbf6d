//! The kinds of remote device the SBC knows, with their stable configuration names.
//!
//! Invariant: [`DeviceType::name`] and [`DeviceType::from_str`] are inverse and the names never
//! change (they are stored in configuration); display names are for people only.

use std::fmt;
use std::str::FromStr;

/// TCP port a system (HFA) phone registers on without TLS (the router maps public 4060 to it).
pub const HFA_TCP_PORT: u16 = 4062;
/// TLS port a system (HFA) phone registers on (the router maps public 4061 to it).
pub const HFA_TLS_PORT: u16 = 4063;
/// HTTPS port the apps and myPortal @work use, public and private alike.
pub const HTTPS_PORT: u16 = 8802;

/// How a device type reaches the SBC to register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// HFA signalling over TCP ([`HFA_TCP_PORT`]) or TLS ([`HFA_TLS_PORT`]).
    Hfa,
    /// HTTPS ([`HTTPS_PORT`]).
    Https,
}

impl Transport {
    /// The SBC's ports for this transport (private side).
    pub fn ports(self) -> &'static [u16] {
        match self {
            Transport::Hfa => &[HFA_TCP_PORT, HFA_TLS_PORT],
            Transport::Https => &[HTTPS_PORT],
        }
    }
}

/// A kind of remote device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceType {
    /// OpenStage HFA system phone.
    OpenStageHfa,
    /// DeskPhone IP HFA system phone.
    DeskPhoneIpHfa,
    /// DeskPhone CP HFA system phone.
    DeskPhoneCpHfa,
    /// myPortal to go app on Android.
    MyPortalToGoAndroid,
    /// myPortal to go app on iOS.
    MyPortalToGoIos,
    /// myPortal @work desktop client (WebRTC).
    MyPortalAtWork,
    /// A third-party SIP device; it does not register through this SBC's HFA or HTTPS ports.
    SipDevice,
}

/// A device type name that is not one of [`DeviceType::ALL`]'s names.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown device type {0:?} (known: {names})", names = DeviceType::names_list())]
pub struct UnknownDeviceType(pub String);

impl DeviceType {
    /// Every device type, in a stable order.
    pub const ALL: [DeviceType; 7] = [
        DeviceType::OpenStageHfa,
        DeviceType::DeskPhoneIpHfa,
        DeviceType::DeskPhoneCpHfa,
        DeviceType::MyPortalToGoAndroid,
        DeviceType::MyPortalToGoIos,
        DeviceType::MyPortalAtWork,
        DeviceType::SipDevice,
    ];

    /// The stable snake_case name used in configuration and on the wire.
    pub fn name(self) -> &'static str {
        match self {
            DeviceType::OpenStageHfa => "openstage_hfa",
            DeviceType::DeskPhoneIpHfa => "deskphone_ip_hfa",
            DeviceType::DeskPhoneCpHfa => "deskphone_cp_hfa",
            DeviceType::MyPortalToGoAndroid => "myportal_to_go_android",
            DeviceType::MyPortalToGoIos => "myportal_to_go_ios",
            DeviceType::MyPortalAtWork => "myportal_at_work",
            DeviceType::SipDevice => "sip_device",
        }
    }

    /// The product name as people know it.
    pub fn display_name(self) -> &'static str {
        match self {
            DeviceType::OpenStageHfa => "OpenStage HFA",
            DeviceType::DeskPhoneIpHfa => "DeskPhone IP HFA",
            DeviceType::DeskPhoneCpHfa => "DeskPhone CP HFA",
            DeviceType::MyPortalToGoAndroid => "myPortal to go Android",
            DeviceType::MyPortalToGoIos => "myPortal to go iOS",
            DeviceType::MyPortalAtWork => "myPortal @work",
            DeviceType::SipDevice => "SIP device",
        }
    }

    /// Whether the device has a MAC address the SBC knows (the system phones do; apps do not;
    /// a SIP device's is none of ours).
    pub fn has_mac(self) -> bool {
        self.is_system_phone()
    }

    /// Whether this is an HFA system phone.
    pub fn is_system_phone(self) -> bool {
        matches!(
            self,
            DeviceType::OpenStageHfa | DeviceType::DeskPhoneIpHfa | DeviceType::DeskPhoneCpHfa
        )
    }

    /// How the device registers with this SBC; `None` for a SIP device (not over our ports).
    pub fn transport(self) -> Option<Transport> {
        match self {
            DeviceType::OpenStageHfa | DeviceType::DeskPhoneIpHfa | DeviceType::DeskPhoneCpHfa => {
                Some(Transport::Hfa)
            }
            DeviceType::MyPortalToGoAndroid
            | DeviceType::MyPortalToGoIos
            | DeviceType::MyPortalAtWork => Some(Transport::Https),
            DeviceType::SipDevice => None,
        }
    }

    fn names_list() -> String {
        DeviceType::ALL.map(DeviceType::name).join(", ")
    }
}

impl fmt::Display for DeviceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.display_name())
    }
}

impl FromStr for DeviceType {
    type Err = UnknownDeviceType;

    /// Parses a stable name ([`DeviceType::name`]), ignoring surrounding blanks and case.
    fn from_str(s: &str) -> Result<DeviceType, UnknownDeviceType> {
        let wanted = s.trim();
        DeviceType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(wanted))
            .ok_or_else(|| UnknownDeviceType(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        for t in DeviceType::ALL {
            assert_eq!(t.name().parse::<DeviceType>(), Ok(t));
            assert_eq!(t.name().to_uppercase().parse::<DeviceType>(), Ok(t));
        }
        let mut names = DeviceType::ALL.map(DeviceType::name).to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DeviceType::ALL.len());
    }

    #[test]
    fn table() {
        use DeviceType::*;
        let cases = [
            (OpenStageHfa, "OpenStage HFA", true, Some(Transport::Hfa)),
            (
                DeskPhoneIpHfa,
                "DeskPhone IP HFA",
                true,
                Some(Transport::Hfa),
            ),
            (
                DeskPhoneCpHfa,
                "DeskPhone CP HFA",
                true,
                Some(Transport::Hfa),
            ),
            (
                MyPortalToGoAndroid,
                "myPortal to go Android",
                false,
                Some(Transport::Https),
            ),
            (
                MyPortalToGoIos,
                "myPortal to go iOS",
                false,
                Some(Transport::Https),
            ),
            (
                MyPortalAtWork,
                "myPortal @work",
                false,
                Some(Transport::Https),
            ),
            (SipDevice, "SIP device", false, None),
        ];
        for (t, display, mac, transport) in cases {
            assert_eq!(t.to_string(), display);
            assert_eq!(t.has_mac(), mac, "{t}");
            assert_eq!(t.transport(), transport, "{t}");
        }
        assert_eq!(Transport::Hfa.ports(), &[4062, 4063]);
        assert_eq!(Transport::Https.ports(), &[8802]);
    }

    #[test]
    fn unknown_names_are_refused() {
        for bad in ["", "openstage", "OpenStage HFA", "sip-device"] {
            let err = bad.parse::<DeviceType>().unwrap_err();
            assert!(err.to_string().starts_with("unknown device type"), "{err}");
        }
    }
}
