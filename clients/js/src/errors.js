/** A refusal or failure of a request, with the server's error code (`forbidden`, `presence_off`, ...). */
export class TidingsError extends Error {
  constructor(code, message, topic) {
    super(message);
    this.name = 'TidingsError';
    this.code = code;
    this.topic = topic === undefined ? null : topic;
  }
}
