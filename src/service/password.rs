//! Passwords: the configured policy, and argon2id hashing off the async threads.

use argon2::{Algorithm, Argon2, Params, PasswordHasher, PasswordVerifier, Version};

use super::Services;
use crate::{
    config::PasswordPolicy,
    error::{Error, Result},
};

/// Checks a new password against the policy (`M_WEAK_PASSWORD` with what is missing).
pub fn check_policy(policy: &PasswordPolicy, password: &str, localpart: &str) -> Result<()> {
    let mut missing = Vec::new();
    if password.chars().count() < policy.min_length {
        missing.push(format!("at least {} characters", policy.min_length));
    }
    if policy.require_digit && !password.chars().any(|c| c.is_ascii_digit()) {
        missing.push("a digit".to_owned());
    }
    if policy.require_lowercase && !password.chars().any(char::is_lowercase) {
        missing.push("a lowercase letter".to_owned());
    }
    if policy.require_uppercase && !password.chars().any(char::is_uppercase) {
        missing.push("an uppercase letter".to_owned());
    }
    if policy.require_symbol && !password.chars().any(|c| !c.is_alphanumeric()) {
        missing.push("a symbol".to_owned());
    }
    if !missing.is_empty() {
        return Err(Error::weak_password(format!("The password needs {}", missing.join(", "))));
    }
    if !localpart.is_empty() && password.to_lowercase().contains(&localpart.to_lowercase()) {
        return Err(Error::weak_password("The password must not contain the user name"));
    }
    if password.len() > 512 {
        return Err(Error::weak_password("The password is too long (512 bytes at most)"));
    }
    Ok(())
}

impl Services {
    fn argon2(&self) -> Result<Argon2<'static>> {
        let c = &self.config.password_hashing;
        let params = Params::new(c.memory_kib, c.iterations, c.parallelism, None).map_err(Error::internal)?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }

    /// Hashes a password with argon2id into a PHC string.
    pub async fn hash_password(&self, password: &str) -> Result<String> {
        let argon2 = self.argon2()?;
        let password = password.to_owned();
        let _permit = self.hashing.acquire().await.map_err(Error::internal)?;
        tokio::task::spawn_blocking(move || {
            argon2.hash_password(password.as_bytes()).map(|h| h.to_string()).map_err(Error::internal)
        })
        .await
        .map_err(Error::internal)?
    }

    /// Checks a password against a stored hash. With no hash (unknown user, or no
    /// password set) it still spends the time of one check and answers `false`, so the
    /// answer's timing does not tell whether the user exists.
    pub async fn verify_password(&self, hash: Option<&str>, password: &str) -> Result<bool> {
        let argon2 = self.argon2()?;
        let password = password.to_owned();
        let hash = hash.map(str::to_owned);
        let _permit = self.hashing.acquire().await.map_err(Error::internal)?;
        tokio::task::spawn_blocking(move || match hash {
            Some(hash) => Ok(PasswordVerifier::<str>::verify_password(&argon2, password.as_bytes(), &hash).is_ok()),
            None => {
                let _ = argon2.hash_password(password.as_bytes());
                Ok(false)
            }
        })
        .await
        .map_err(Error::internal)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_wants_strong_passwords() {
        let policy = PasswordPolicy::default();
        let weak = |p: &str| check_policy(&policy, p, "alice").unwrap_err().errcode();
        assert_eq!(weak("Short1"), "M_WEAK_PASSWORD");
        assert_eq!(weak("alllowercase123"), "M_WEAK_PASSWORD");
        assert_eq!(weak("NoDigitsHereAtAll"), "M_WEAK_PASSWORD");
        assert_eq!(weak("Alice1234567"), "M_WEAK_PASSWORD");
        check_policy(&policy, "Correct-Horse-9", "alice").unwrap();
    }
}
