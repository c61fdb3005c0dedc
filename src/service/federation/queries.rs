//! Queries across servers: profiles, room aliases and public room directories. Each
//! has a local side (what this server answers other servers) and a remote side (what a
//! local client asks of another server, through `send_federation_request`).

use ruma::{
    OwnedRoomId, OwnedServerName, RoomAliasId, ServerName, UserId,
    api::federation::{
        directory::{get_public_rooms, get_public_rooms_filtered},
        query::{get_profile_information, get_room_information},
    },
    profile::{ProfileFieldName, UserProfile},
};

use crate::{
    error::{Error, Result},
    service::Services,
};

impl Services {
    /// A user's profile (or only `field` of it): read here for local users, asked of
    /// the user's server for others.
    pub async fn lookup_profile(&self, user_id: &UserId, field: Option<&str>) -> Result<UserProfile> {
        if user_id.server_name() == self.server_name() {
            return self.get_profile(user_id).await;
        }
        let mut request = get_profile_information::v1::Request::new(user_id.to_owned());
        request.field = field.map(ProfileFieldName::from);
        Ok(self.send_federation_request(user_id.server_name(), request).await?.data)
    }

    /// Federation `query/profile`: a local user's profile, or one field of it.
    pub async fn query_profile(&self, user_id: &UserId, field: Option<&ProfileFieldName>) -> Result<UserProfile> {
        if user_id.server_name() != self.server_name() {
            return Err(Error::not_found(format!("{user_id} is not a user of this server")));
        }
        let profile = self.get_profile(user_id).await?;
        Ok(match field {
            None => profile,
            Some(field) => profile
                .iter()
                .filter(|(name, _)| name.as_str() == field.as_str())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }

    /// A room alias: resolved here for local aliases, asked of the alias's server for
    /// others. Answers the room and servers that can be joined through.
    pub async fn lookup_alias(&self, alias: &RoomAliasId) -> Result<(OwnedRoomId, Vec<OwnedServerName>)> {
        if alias.server_name() == self.server_name() {
            return self.query_directory(alias).await;
        }
        let response = self
            .send_federation_request(alias.server_name(), get_room_information::v1::Request::new(alias.to_owned()))
            .await?;
        Ok((response.room_id, response.servers))
    }

    /// Federation `query/directory`: one of this server's aliases. The servers are
    /// this one (the rooms Convo knows are all joined here).
    pub async fn query_directory(&self, alias: &RoomAliasId) -> Result<(OwnedRoomId, Vec<OwnedServerName>)> {
        if alias.server_name() != self.server_name() {
            return Err(Error::not_found(format!("{alias} is not an alias of this server")));
        }
        let room_id = self.resolve_alias(alias).await?;
        Ok((room_id, vec![self.server_name().clone()]))
    }

    /// Another server's public room directory (the client's `publicRooms` with
    /// `server`): `filter` set asks with `POST`, else `GET`.
    pub async fn remote_public_rooms(
        &self,
        server: &ServerName,
        limit: Option<ruma::UInt>,
        since: Option<String>,
        filter: Option<ruma::directory::Filter>,
    ) -> Result<get_public_rooms_filtered::v1::Response> {
        match filter {
            Some(filter) => {
                let mut request = get_public_rooms_filtered::v1::Request::new();
                request.limit = limit;
                request.since = since;
                request.filter = filter;
                self.send_federation_request(server, request).await
            }
            None => {
                let mut request = get_public_rooms::v1::Request::new();
                request.limit = limit;
                request.since = since;
                let r = self.send_federation_request(server, request).await?;
                let mut response = get_public_rooms_filtered::v1::Response::new();
                response.chunk = r.chunk;
                response.next_batch = r.next_batch;
                response.prev_batch = r.prev_batch;
                response.total_room_count_estimate = r.total_room_count_estimate;
                Ok(response)
            }
        }
    }
}
