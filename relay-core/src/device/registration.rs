//! Whether a device may register, and whether its Internet-registration flag may be set.
//!
//! Invariant: from an external source a device registers only with the Internet-registration
//! flag, authentication on, a password that is strong under the policy in force *now* (the
//! check is rerun at every decision, so a stricter policy locks out devices whose password
//! became weak) and firmware at or above the minimum. Internal sources are the PBX's ordinary
//! business and are not restricted here.

use super::firmware::{FirmwarePolicy, FirmwareRefusal};
use super::networks::Origin;
use super::password::{PasswordPolicy, WeakPassword};
use super::{DeviceType, MacAddress};

/// What the decisions need to know about a device (borrowed from its configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Device<'a> {
    /// Its type.
    pub device_type: DeviceType,
    /// Its internal number (its identity).
    pub number: &'a str,
    /// Its MAC address, for the system phones.
    pub mac: Option<MacAddress>,
    /// Per-device authentication is on.
    pub authentication: bool,
    /// The "Internet registration through the SBC" flag.
    pub internet_registration: bool,
    /// The device password as the configuration keeps it (the PBX needs it for the phones'
    /// login), `None` if none is set.
    pub password: Option<&'a str>,
    /// The firmware version the device reported, if any.
    pub firmware: Option<&'a str>,
}

/// The policies the decisions apply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegistrationPolicy {
    /// When a password is strong.
    pub passwords: PasswordPolicy,
    /// Minimum firmware for Internet registration.
    pub firmware: FirmwarePolicy,
}

/// Why a device may not register from the Internet (or have the flag set).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistrationRefusal {
    /// The Internet-registration flag is not set.
    #[error("internet registration through the sbc is not enabled for this device")]
    InternetRegistrationOff,
    /// Authentication is off.
    #[error("authentication is off for this device")]
    AuthenticationOff,
    /// No password is set.
    #[error("the device has no password")]
    NoPassword,
    /// The password is weak under the policy in force.
    #[error(transparent)]
    WeakPassword(#[from] WeakPassword),
    /// The firmware is below the minimum or unreadable.
    #[error(transparent)]
    Firmware(#[from] FirmwareRefusal),
    /// The device type has a minimum firmware but the device reported no version.
    #[error("the device reported no firmware version; {0} needs a minimum version")]
    FirmwareUnknown(DeviceType),
    /// The stored password (judged when it was set: the registry keeps only its verifier)
    /// does not meet the policy now; the guidelines, joined.
    #[error("the stored password is weak: {0}")]
    WeakPasswordStored(String),
    /// No such device (deleted while it registered).
    #[error("no such device")]
    UnknownDevice,
}

/// Whether `device`'s Internet-registration flag may be set: authentication on and a strong
/// password; on refusal a [`RegistrationRefusal::WeakPassword`] lists the guidelines to show.
pub fn may_enable_internet_registration(
    device: &Device<'_>,
    policy: &RegistrationPolicy,
) -> Result<(), RegistrationRefusal> {
    if !device.authentication {
        return Err(RegistrationRefusal::AuthenticationOff);
    }
    let password = device.password.ok_or(RegistrationRefusal::NoPassword)?;
    policy
        .passwords
        .check(password, device.number, device.mac)?;
    Ok(())
}

/// Whether `device` may register from a source of `origin`; the first unmet condition is the
/// refusal (flag, authentication, password, firmware).
pub fn may_register(
    device: &Device<'_>,
    origin: Origin,
    policy: &RegistrationPolicy,
) -> Result<(), RegistrationRefusal> {
    if origin == Origin::Internal {
        return Ok(());
    }
    if !device.internet_registration {
        return Err(RegistrationRefusal::InternetRegistrationOff);
    }
    may_enable_internet_registration(device, policy)?;
    if policy.firmware.minimum(device.device_type).is_some() {
        let firmware = device
            .firmware
            .ok_or(RegistrationRefusal::FirmwareUnknown(device.device_type))?;
        policy.firmware.check(device.device_type, firmware)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::password::Guideline;

    const STRONG: &str = "Tr0mbone-Kiwi";

    fn phone() -> Device<'static> {
        Device {
            device_type: DeviceType::OpenStageHfa,
            number: "4711",
            mac: Some(MacAddress([0, 0x1a, 0xe8, 1, 2, 3])),
            authentication: true,
            internet_registration: true,
            password: Some(STRONG),
            firmware: Some("V3 R0.40.4"),
        }
    }

    #[test]
    fn table() {
        use RegistrationRefusal as R;
        let policy = RegistrationPolicy::default();
        type Case = (
            &'static str,
            fn(&mut Device<'static>),
            Option<fn(&R) -> bool>,
        );
        let cases: &[Case] = &[
            ("ok", |_| {}, None),
            (
                "flag off",
                |d| d.internet_registration = false,
                Some(|r| *r == R::InternetRegistrationOff),
            ),
            (
                "auth off",
                |d| d.authentication = false,
                Some(|r| *r == R::AuthenticationOff),
            ),
            (
                "no password",
                |d| d.password = None,
                Some(|r| *r == R::NoPassword),
            ),
            (
                "weak",
                |d| d.password = Some("Kiwi4711Banane"),
                Some(|r| matches!(r, R::WeakPassword(w) if w.unmet == [Guideline::NoDeviceNumber])),
            ),
            (
                "old firmware",
                |d| d.firmware = Some("V3 R0.39.0"),
                Some(|r| matches!(r, R::Firmware(FirmwareRefusal::TooOld { .. }))),
            ),
            (
                "bad firmware",
                |d| d.firmware = Some("three"),
                Some(|r| matches!(r, R::Firmware(FirmwareRefusal::Unparsable(_)))),
            ),
            (
                "no firmware",
                |d| d.firmware = None,
                Some(|r| *r == R::FirmwareUnknown(DeviceType::OpenStageHfa)),
            ),
            (
                "sip device, no firmware",
                |d| {
                    d.device_type = DeviceType::SipDevice;
                    d.firmware = None;
                },
                None,
            ),
        ];
        for (name, change, refusal) in cases {
            let mut device = phone();
            change(&mut device);
            let got = may_register(&device, Origin::External, &policy);
            match refusal {
                None => assert_eq!(got, Ok(()), "{name}"),
                Some(want) => {
                    let err = got.expect_err(name);
                    assert!(want(&err), "{name}: {err:?}");
                }
            }
            // From inside, nothing here restricts.
            assert_eq!(
                may_register(&device, Origin::Internal, &policy),
                Ok(()),
                "{name}"
            );
        }
    }

    #[test]
    fn a_stricter_policy_locks_out_a_weakened_password() {
        let device = phone();
        let mut policy = RegistrationPolicy::default();
        assert_eq!(may_register(&device, Origin::External, &policy), Ok(()));
        policy.passwords.min_length = 16;
        let err = may_register(&device, Origin::External, &policy).unwrap_err();
        assert_eq!(
            err,
            RegistrationRefusal::WeakPassword(WeakPassword {
                unmet: vec![Guideline::MinLength(16)]
            })
        );
        assert_eq!(
            err.to_string(),
            "the password is not strong enough: at least 16 characters"
        );
    }

    #[test]
    fn the_flag_needs_authentication_and_a_strong_password() {
        let policy = RegistrationPolicy::default();
        let mut device = phone();
        device.internet_registration = false;
        assert_eq!(may_enable_internet_registration(&device, &policy), Ok(()));
        device.password = Some("password");
        assert!(matches!(
            may_enable_internet_registration(&device, &policy),
            Err(RegistrationRefusal::WeakPassword(_))
        ));
        device.authentication = false;
        assert_eq!(
            may_enable_internet_registration(&device, &policy),
            Err(RegistrationRefusal::AuthenticationOff)
        );
    }
}
