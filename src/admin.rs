//! `convo admin ...`: account and registration-token administration, and users'
//! reports of events and rooms, run against
//! the same configuration (and database) as the server.

use std::{io::Read, sync::Arc};

use clap::{Args, Subcommand};

use crate::{config::Config, server::open_services, service::generate_registration_token};

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create a user (no registration token needed).
    CreateUser {
        /// The localpart: `alice` for @alice:your.server.
        localpart: String,
        #[command(flatten)]
        password: PasswordArgs,
        /// Make the user a server admin.
        #[arg(long)]
        admin: bool,
    },
    /// Set a new password for a user and sign out all their devices.
    ResetPassword {
        /// `@alice:your.server` or `alice`.
        user: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
    /// Manage registration tokens.
    #[command(subcommand)]
    RegistrationToken(TokenCommand),
    /// List users' reports of events and rooms, newest first.
    Reports {
        /// How many to list.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Manage media: quarantine, delete, list a user's uploads.
    #[command(subcommand)]
    Media(MediaCommand),
}

#[derive(Debug, Subcommand)]
pub enum MediaCommand {
    /// Quarantine a media item: it is then not found, here and for other servers.
    Quarantine {
        /// `mxc://server/mediaId`
        mxc: String,
        /// Release it from quarantine instead.
        #[arg(long)]
        release: bool,
    },
    /// Delete a media item and its thumbnails (its file too, if no other item has the same bytes).
    Delete {
        /// `mxc://server/mediaId`
        mxc: String,
    },
    /// List a user's uploads, newest first.
    List {
        /// `@alice:your.server` or `alice`.
        user: String,
        /// How many at most.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Debug, Args)]
pub struct PasswordArgs {
    /// The password (visible to other local users in the process list: prefer
    /// --password-stdin). Without either, a strong random password is made and printed.
    #[arg(long, conflicts_with = "password_stdin")]
    password: Option<String>,
    /// Read the password from standard input.
    #[arg(long)]
    password_stdin: bool,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it.
    Create {
        /// The token itself (default: 20 random characters). Allowed: A-Z a-z 0-9 . _ ~ -
        #[arg(long)]
        token: Option<String>,
        /// How many registrations it allows (default: unlimited).
        #[arg(long)]
        uses: Option<u32>,
        /// Days until it expires (default: never).
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    /// List tokens with their use counts and expiry.
    List,
    /// Delete a token.
    Revoke { token: String },
}

impl PasswordArgs {
    /// The password given, or a generated one (then `true`: print it).
    fn resolve(&self) -> Result<(String, bool), String> {
        if let Some(p) = &self.password {
            return Ok((p.clone(), false));
        }
        if self.password_stdin {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map_err(|e| format!("cannot read standard input: {e}"))?;
            return Ok((s.trim_end_matches(['\n', '\r']).to_owned(), false));
        }
        let generated = format!("{}-{}-9Aa", generate_registration_token(), generate_registration_token());
        Ok((generated, true))
    }
}

fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 64
        && token.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | '-'))
}

/// Runs one admin command; returns what to print.
pub async fn run(config: Config, command: AdminCommand) -> Result<String, String> {
    let addr = config.listeners.client;
    let services = open_services(Arc::new(config), addr).await?;
    let out = match command {
        AdminCommand::CreateUser { localpart, password, admin } => {
            let (password, generated) = password.resolve()?;
            let user_id = services.create_user_admin(&localpart, &password, admin).await.map_err(describe)?;
            let mut out = format!("created {user_id}{}", if admin { " (admin)" } else { "" });
            if generated {
                out.push_str(&format!("\npassword: {password}"));
            }
            out
        }
        AdminCommand::ResetPassword { user, password } => {
            let (password, generated) = password.resolve()?;
            let user_id = services.reset_password_admin(&user, &password).await.map_err(describe)?;
            let mut out = format!("reset the password of {user_id} and signed out all its devices");
            if generated {
                out.push_str(&format!("\npassword: {password}"));
            }
            out
        }
        AdminCommand::RegistrationToken(TokenCommand::Create { token, uses, expires_in_days }) => {
            let token = token.unwrap_or_else(generate_registration_token);
            if !valid_token(&token) {
                return Err("a token is 1 to 64 characters of A-Z a-z 0-9 . _ ~ -".into());
            }
            let now = crate::service::now_ms();
            let expiry = expires_in_days.map(|d| now + i64::from(d) * 86_400_000);
            services
                .store
                .create_registration_token(&token, uses.map(i64::from), expiry, now)
                .await
                .map_err(describe)?;
            token
        }
        AdminCommand::RegistrationToken(TokenCommand::List) => {
            let tokens = services.store.list_registration_tokens().await.map_err(describe)?;
            let mut out = String::from("token\tuses_allowed\tpending\tcompleted\texpiry_ts");
            for t in tokens {
                let allowed = t.uses_allowed.map(|u| u.to_string()).unwrap_or_else(|| "unlimited".into());
                let expiry = t.expiry_ts.map(|e| e.to_string()).unwrap_or_else(|| "never".into());
                out.push_str(&format!("\n{}\t{allowed}\t{}\t{}\t{expiry}", t.token, t.pending, t.completed));
            }
            out
        }
        AdminCommand::RegistrationToken(TokenCommand::Revoke { token }) => {
            if !services.store.delete_registration_token(&token).await.map_err(describe)? {
                return Err(format!("no registration token {token}"));
            }
            format!("revoked {token}")
        }
        AdminCommand::Reports { limit } => {
            let reports = services.store.list_reports(i64::from(limit)).await.map_err(describe)?;
            let mut out = String::from("id\treceived_ts\troom_id\tevent_id\treporter\treason");
            for r in reports {
                // One line per report: tabs and line breaks in a reason would break it.
                let reason = r.reason.unwrap_or_default().replace(['\t', '\n', '\r'], " ");
                let event = r.event_id.unwrap_or_else(|| "-".into());
                out.push_str(&format!(
                    "\n{}\t{}\t{}\t{event}\t{}\t{reason}",
                    r.report_id, r.received_ts, r.room_id, r.reporter
                ));
            }
            out
        }
        AdminCommand::Media(command) => media(&services, command).await?,
    };
    services.store.close().await;
    Ok(out)
}

async fn media(services: &crate::service::Services, command: MediaCommand) -> Result<String, String> {
    Ok(match command {
        MediaCommand::Quarantine { mxc, release } => {
            services.quarantine_media(&mxc, !release).await.map_err(describe)?;
            format!("{} {mxc}", if release { "released" } else { "quarantined" })
        }
        MediaCommand::Delete { mxc } => {
            services.delete_media(&mxc).await.map_err(describe)?;
            format!("deleted {mxc}")
        }
        MediaCommand::List { user, limit } => {
            let user_id = if user.starts_with('@') { user } else { format!("@{user}:{}", services.server_name()) };
            let items = services.list_user_media(&user_id, i64::from(limit)).await.map_err(describe)?;
            let mut out = String::from("mxc\tsize\tcontent_type\tfile_name\tcreated_ts\tquarantined");
            for m in items {
                out.push_str(&format!(
                    "\nmxc://{}/{}\t{}\t{}\t{}\t{}\t{}",
                    m.server_name,
                    m.media_id,
                    m.size,
                    m.content_type.as_deref().unwrap_or("-"),
                    m.file_name.as_deref().unwrap_or("-"),
                    m.created_ts,
                    m.quarantined
                ));
            }
            out
        }
    })
}

fn describe(e: crate::error::Error) -> String {
    match e {
        crate::error::Error::Matrix { message, .. } => message,
        other => other.to_string(),
    }
}
