//! `homerelay devices …`: the device registry of a running relay from the command line.
//!
//! Passwords are read from a file or standard input, never from a flag: other users see
//! command lines (`ps`).
use std::fmt::Write as _;
use std::io::Read as _;
use std::path::PathBuf;

use anyhow::Context as _;
use proto::v1 as pb;
use proto::v1::device_service_client::DeviceServiceClient;
use relay_core::device::DeviceType;
use serde_json::json;

use crate::client::{Connection, call_error, connect_channel};
use crate::devices_api::{device_type_from_pb, device_type_to_pb};

/// `homerelay devices ...`.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum DevicesCommand {
    /// List every device with its registration status.
    List,
    /// Show one device.
    Show {
        /// Its internal number.
        number: String,
    },
    /// Create a device.
    Create(CreateArgs),
    /// Change a device (only what is given).
    Update(UpdateArgs),
    /// Delete a device (ends its registration).
    Delete {
        /// Its internal number.
        number: String,
    },
    /// Ask whether a device may call a number (or forward calls to it).
    Authorize {
        /// The calling device's internal number.
        number: String,
        /// The dialled number or forwarding target.
        target: String,
        /// The target is a call-forwarding destination.
        #[arg(long)]
        forwarding: bool,
    },
    /// Print device events as they happen (registrations, refusals with their source,
    /// lockouts, refused calls) until interrupted; one line each, or JSON lines with --json.
    Watch {
        /// Only this device's events (default: every device).
        number: Option<String>,
    },
}

/// Where a password comes from.
#[derive(Clone, Debug, clap::Args)]
pub struct PasswordArgs {
    /// Read the device's password from this file (trailing newline removed).
    #[arg(long, conflicts_with = "password_stdin")]
    pub password_file: Option<PathBuf>,
    /// Read the device's password from standard input (trailing newline removed).
    #[arg(long)]
    pub password_stdin: bool,
}

impl PasswordArgs {
    fn read(&self) -> anyhow::Result<Option<String>> {
        let text = if let Some(path) = &self.password_file {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        } else if self.password_stdin {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the password from standard input")?;
            s
        } else {
            return Ok(None);
        };
        Ok(Some(text.trim_end_matches(['\r', '\n']).to_owned()))
    }
}

fn parse_type(s: &str) -> Result<DeviceType, String> {
    s.parse()
        .map_err(|e: relay_core::device::UnknownDeviceType| e.to_string())
}

/// How far a device may call.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ReachArg {
    InternalOnly,
    Local,
    National,
    International,
}

impl ReachArg {
    fn to_pb(self) -> pb::Reach {
        match self {
            ReachArg::InternalOnly => pb::Reach::InternalOnly,
            ReachArg::Local => pb::Reach::Local,
            ReachArg::National => pb::Reach::National,
            ReachArg::International => pb::Reach::International,
        }
    }
}

/// `devices create`.
#[derive(Clone, Debug, clap::Args)]
pub struct CreateArgs {
    /// Internal number (the device's identity), 1 to 32 digits.
    pub number: String,
    /// openstage_hfa, deskphone_ip_hfa, deskphone_cp_hfa, myportal_to_go_android,
    /// myportal_to_go_ios, myportal_at_work or sip_device.
    #[arg(long = "type", value_parser = parse_type)]
    pub device_type: DeviceType,
    /// MAC address (phones).
    #[arg(long)]
    pub mac: Option<String>,
    /// Authentication off (a device without a password; never allowed from the internet).
    #[arg(long)]
    pub no_authentication: bool,
    /// Allow registration from the internet through the SBC (needs a strong password).
    #[arg(long)]
    pub internet: bool,
    /// How far it may call (default: internal only).
    #[arg(long, value_enum)]
    pub reach: Option<ReachArg>,
    /// Premium-rate numbers allowed (within its reach).
    #[arg(long)]
    pub premium_rate: bool,
    /// Call forwarding to external numbers allowed (within its reach).
    #[arg(long)]
    pub forward_external: bool,
    /// Codecs it may use (repeat or comma-separate); default: any.
    #[arg(long, value_delimiter = ',')]
    pub codecs: Vec<String>,
    #[command(flatten)]
    pub password: PasswordArgs,
}

/// `devices update`.
#[derive(Clone, Debug, clap::Args)]
pub struct UpdateArgs {
    /// Internal number of the device to change.
    pub number: String,
    /// A new device type.
    #[arg(long = "type", value_parser = parse_type)]
    pub device_type: Option<DeviceType>,
    /// A new MAC address ("" removes it).
    #[arg(long)]
    pub mac: Option<String>,
    /// Authentication on or off.
    #[arg(long)]
    pub authentication: Option<bool>,
    /// Internet registration through the SBC on or off.
    #[arg(long)]
    pub internet: Option<bool>,
    /// A new class of service: how far it may call.
    #[arg(long, value_enum)]
    pub reach: Option<ReachArg>,
    /// With --reach: premium-rate numbers allowed.
    #[arg(long, requires = "reach")]
    pub premium_rate: bool,
    /// With --reach: call forwarding to external numbers allowed.
    #[arg(long, requires = "reach")]
    pub forward_external: bool,
    /// Replace the codec list (repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    pub codecs: Option<Vec<String>>,
    /// Remove the password.
    #[arg(long, conflicts_with_all = ["password_file", "password_stdin"])]
    pub remove_password: bool,
    #[command(flatten)]
    pub password: PasswordArgs,
}

/// Runs `homerelay devices ...`.
pub async fn run(c: &Connection, command: DevicesCommand) -> anyhow::Result<()> {
    let (channel, token) = connect_channel(c).await?;
    let mut client = DeviceServiceClient::with_interceptor(channel, token);
    match command {
        DevicesCommand::List => {
            let r = client
                .list_devices(pb::ListDevicesRequest {})
                .await
                .map_err(call_error)?
                .into_inner();
            if c.json {
                let all: Vec<_> = r.devices.iter().map(device_json).collect();
                println!("{}", serde_json::Value::Array(all));
            } else {
                print!("{}", device_table(&r.devices));
            }
        }
        DevicesCommand::Show { number } => {
            let r = client
                .get_device(pb::GetDeviceRequest { number })
                .await
                .map_err(call_error)?
                .into_inner();
            print_device(c.json, r.device.as_ref());
        }
        DevicesCommand::Create(a) => {
            let password = a.password.read()?.unwrap_or_default();
            let device = pb::Device {
                number: a.number,
                r#type: device_type_to_pb(a.device_type) as i32,
                mac: a.mac.unwrap_or_default(),
                authentication: !a.no_authentication,
                internet_registration: a.internet,
                class_of_service: Some(pb::ClassOfService {
                    reach: a.reach.map_or(pb::Reach::InternalOnly, ReachArg::to_pb) as i32,
                    premium_rate: a.premium_rate,
                    forward_external: a.forward_external,
                }),
                codecs: a.codecs,
                ..pb::Device::default()
            };
            let r = client
                .create_device(pb::CreateDeviceRequest {
                    device: Some(device),
                    password,
                })
                .await
                .map_err(call_error)?
                .into_inner();
            print_device(c.json, r.device.as_ref());
        }
        DevicesCommand::Update(a) => {
            let password = if a.remove_password {
                Some(String::new())
            } else {
                a.password.read()?
            };
            let r = client
                .update_device(pb::UpdateDeviceRequest {
                    number: a.number,
                    r#type: a.device_type.map(|t| device_type_to_pb(t) as i32),
                    mac: a.mac,
                    authentication: a.authentication,
                    internet_registration: a.internet,
                    class_of_service: a.reach.map(|r| pb::ClassOfService {
                        reach: r.to_pb() as i32,
                        premium_rate: a.premium_rate,
                        forward_external: a.forward_external,
                    }),
                    replace_codecs: a.codecs.is_some(),
                    codecs: a.codecs.unwrap_or_default(),
                    password,
                })
                .await
                .map_err(call_error)?
                .into_inner();
            print_device(c.json, r.device.as_ref());
        }
        DevicesCommand::Delete { number } => {
            let r = client
                .delete_device(pb::DeleteDeviceRequest { number })
                .await
                .map_err(call_error)?
                .into_inner();
            if c.json {
                println!("{}", r.device.as_ref().map_or(json!(null), device_json));
            } else if let Some(d) = r.device {
                println!("deleted device {}", d.number);
            }
        }
        DevicesCommand::Authorize {
            number,
            target,
            forwarding,
        } => {
            let r = client
                .authorize_call(pb::AuthorizeCallRequest {
                    number: number.clone(),
                    target: target.clone(),
                    forwarding,
                })
                .await
                .map_err(call_error)?
                .into_inner();
            if c.json {
                println!(
                    "{}",
                    json!({"allowed": r.allowed, "target_class": r.target_class,
                           "reason": r.reason, "external": r.external})
                );
            } else if r.allowed {
                println!("allowed: {number} may reach {target} ({})", r.target_class);
            } else {
                println!("refused: {}", r.reason);
            }
            if !r.allowed {
                std::process::exit(3);
            }
        }
        DevicesCommand::Watch { number } => {
            let mut stream = client
                .watch_devices(pb::WatchDevicesRequest {
                    number: number.unwrap_or_default(),
                })
                .await
                .map_err(call_error)?
                .into_inner();
            while let Some(event) = stream.message().await.map_err(call_error)? {
                let kind =
                    pb::DeviceEventType::try_from(event.r#type).map_or("unknown", |t| match t {
                        pb::DeviceEventType::Registered => "registered",
                        pb::DeviceEventType::Unregistered => "unregistered",
                        pb::DeviceEventType::RegistrationRefused => "registration_refused",
                        pb::DeviceEventType::LockedOut => "locked_out",
                        pb::DeviceEventType::CallRefused => "call_refused",
                        pb::DeviceEventType::Unspecified => "unspecified",
                    });
                let at = crate::client::time_text(event.at.as_ref()).unwrap_or_default();
                if c.json {
                    println!(
                        "{}",
                        json!({"type": kind, "number": event.number, "transport": event.transport,
                               "source": event.source, "external": event.external,
                               "reason": event.reason, "at": at})
                    );
                } else {
                    let mut line = format!("{at}  {kind:<21} {}", event.number);
                    for (label, value) in [
                        ("via", event.transport.as_str()),
                        ("from", event.source.as_str()),
                        ("reason", event.reason.as_str()),
                    ] {
                        if !value.is_empty() {
                            line.push_str(&format!("  {label} {value}"));
                        }
                    }
                    if event.external {
                        line.push_str("  (external)");
                    }
                    println!("{line}");
                }
            }
        }
    }
    Ok(())
}

fn type_name(t: i32) -> &'static str {
    device_type_from_pb(t).map_or("unknown", |t| t.name())
}

fn reach_name(c: Option<&pb::ClassOfService>) -> &'static str {
    match c.map(|c| pb::Reach::try_from(c.reach)) {
        Some(Ok(pb::Reach::Local)) => "local",
        Some(Ok(pb::Reach::National)) => "national",
        Some(Ok(pb::Reach::International)) => "international",
        _ => "internal_only",
    }
}

fn device_json(d: &pb::Device) -> serde_json::Value {
    let cos = d.class_of_service.as_ref();
    json!({
        "number": d.number,
        "type": type_name(d.r#type),
        "mac": (!d.mac.is_empty()).then_some(&d.mac),
        "authentication": d.authentication,
        "internet_registration": d.internet_registration,
        "class_of_service": {
            "reach": reach_name(cos),
            "premium_rate": cos.is_some_and(|c| c.premium_rate),
            "forward_external": cos.is_some_and(|c| c.forward_external),
        },
        "codecs": d.codecs,
        "has_password": d.has_password,
        "weak_password": d.weak_password,
        "registration": d.registration.as_ref().map(|r| json!({
            "transport": r.transport,
            "public_address": r.public_address,
            "local_address": r.local_address,
            "firmware": r.firmware,
            "external": r.external,
        })),
    })
}

fn print_device(json: bool, d: Option<&pb::Device>) {
    let Some(d) = d else { return };
    if json {
        println!("{}", device_json(d));
        return;
    }
    let mut out = String::new();
    let _ = writeln!(out, "number       {}", d.number);
    let _ = writeln!(out, "type         {}", type_name(d.r#type));
    if !d.mac.is_empty() {
        let _ = writeln!(out, "mac          {}", d.mac);
    }
    let _ = writeln!(
        out,
        "auth         {}{}",
        if d.authentication { "on" } else { "off" },
        if d.has_password {
            ", password set"
        } else {
            ", no password"
        }
    );
    let _ = writeln!(
        out,
        "internet     {}",
        if d.internet_registration {
            "may register through the SBC"
        } else {
            "internal only"
        }
    );
    let cos = d.class_of_service.as_ref();
    let _ = writeln!(
        out,
        "cos          {}{}{}",
        reach_name(cos),
        if cos.is_some_and(|c| c.premium_rate) {
            ", premium rate"
        } else {
            ""
        },
        if cos.is_some_and(|c| c.forward_external) {
            ", forwards outside"
        } else {
            ""
        }
    );
    for w in &d.weak_password {
        let _ = writeln!(out, "WEAK         {w}");
    }
    match &d.registration {
        Some(r) => {
            let _ = writeln!(
                out,
                "registered   over {} from {} ({}), media {}, firmware {}",
                r.transport,
                r.public_address,
                if r.external { "internet" } else { "internal" },
                if r.local_address.is_empty() {
                    "-"
                } else {
                    &r.local_address
                },
                r.firmware
            );
        }
        None => {
            let _ = writeln!(out, "registered   no");
        }
    }
    print!("{out}");
}

fn device_table(devices: &[pb::Device]) -> String {
    let mut out = format!(
        "{:<12} {:<24} {:<8} {:<10} {}\n",
        "NUMBER", "TYPE", "INTERNET", "PASSWORD", "REGISTERED"
    );
    for d in devices {
        let password = match (d.has_password, d.weak_password.is_empty()) {
            (false, _) => "none",
            (true, true) => "strong",
            (true, false) => "WEAK",
        };
        let registered = d.registration.as_ref().map_or("-".to_owned(), |r| {
            format!("{} {}", r.transport, r.public_address)
        });
        let _ = writeln!(
            out,
            "{:<12} {:<24} {:<8} {:<10} {}",
            d.number,
            type_name(d.r#type),
            if d.internet_registration { "yes" } else { "no" },
            password,
            registered
        );
    }
    out
}
